"""clsuite's EWC, MAS, SI, A-GEM and LwF against avalanche-lib 0.6.0's plugins on a tiny float64 causal LM: the same
weights and batches, each quantity equal after aligning the definitions (docs/avalanche.md, "Cross-checks")."""
from __future__ import annotations

import copy
import random
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from avalanche.training.plugins import AGEMPlugin, EWCPlugin, LwFPlugin, MASPlugin, SynapticIntelligencePlugin
from datasets import Dataset
from torch import nn
from torch.utils.data import TensorDataset

from clsuite.config import RunConfig
from clsuite.data import collate, lm_loss
from clsuite.engine import Context
from clsuite.strategies.agem import project
from clsuite.strategy import Strategy, build_strategy
from clsuite.streams import Task

from conftest import tiny_llama

# Avalanche's SI calls np.square on tensors
pytestmark = pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning")

DT = torch.float64
# Targets of 2, 4, 3 and 6 tokens (EOS included): the per-token and per-example means differ.
ROWS = [{"prompt": "3+4=", "target": "7"}, {"prompt": "ab", "target": "cde"},
        {"prompt": "x y", "target": "ok"}, {"prompt": "9-2=", "target": "seven"}]
ROWS_B = [{"prompt": "k:", "target": "zz"}, {"prompt": "12", "target": "q"},
          {"prompt": "m?", "target": "w, v"}]
SAME_LENGTH = [{"prompt": "ab", "target": "xyz"}, {"prompt": "q=", "target": "123"},
               {"prompt": "no", "target": "yes"}]  # 4 target tokens each: per-token mean = per-example mean
# Tolerances, per tensor: |a − b| ≤ rtol · (|b| + max |b|) (sums of terms of either sign err relative to the terms).
# The model is float64 but not all of it: LlamaRMSNorm computes in float32 (so do its gradients), clsuite's lm_loss
# takes the NLL in float32 (logits.float()) and Avalanche keeps EWC's, MAS's and SI's sums in float32 (ParamData).
# Gradients and what is built from them agree to float32 rounding (F32); logits and formulas to float64's (F64).
F32, F64 = 1e-5, 1e-10


class TokenRows(nn.Module):
    """A causal LM as Avalanche sees a classifier: ``x`` stacks (input ids, attention mask, labels) on dim 1; the
    output is the logits at the positions that predict a target token (label not -100), flattened to (N, V)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, mask, labels = x.unbind(1)
        logits = self.lm(input_ids=ids, attention_mask=mask).logits
        return logits[:, :-1][labels[:, 1:] != -100]


def criterion(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Avalanche's criterion for TokenRows: cross-entropy averaged over the batch's target tokens (pooled)."""
    return F.cross_entropy(out, y[:, 1:][y[:, 1:] != -100])


def model_and_tok(seed: int = 0):
    model, tok = tiny_llama(seed=seed)
    return model.to(DT), tok


def plugin_of(spec: str) -> Strategy:
    return build_strategy(spec)[0]


def context(model: nn.Module, tok, plugin: Strategy, rows: list[dict], experience: int = 0) -> Context:
    """A real clsuite Context running ``plugin`` on task ``rows`` (no stream: no experience counts as the last)."""
    ctx = Context(model, tok, None, RunConfig(stream="unit", strategy=repr(plugin), seed=0), [plugin],
                  random.Random(0))
    data = Dataset.from_list(rows)
    ctx.experience, ctx.task = experience, Task(f"t{experience}", data, data, "exact_match")
    return ctx


def stacked(tok, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, labels) of ``rows`` as TokenRows reads them (one right-padded batch, clsuite's tokenization)."""
    b = collate(tok, rows, False, 128)
    return torch.stack([b["input_ids"], b["attention_mask"], b["labels"]], 1), b["labels"]


def av_dataset(tok, rows: list[dict]) -> TensorDataset:
    x, y = stacked(tok, rows)
    return TensorDataset(x, y, torch.zeros(len(rows), dtype=torch.long))


def av_strategy(wrapper: TokenRows, tok, rows: list[dict], mb_size: int, exp: int = 0) -> SimpleNamespace:
    """The attributes Avalanche's plugin hooks read from a strategy."""
    return SimpleNamespace(model=wrapper, _criterion=criterion, device="cpu", train_mb_size=mb_size,
                           optimizer=torch.optim.SGD(wrapper.parameters(), lr=0.1),
                           experience=SimpleNamespace(dataset=av_dataset(tok, rows)),
                           clock=SimpleNamespace(train_exp_counter=exp), loss=torch.zeros((), dtype=DT))


def ours(named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Avalanche's names for TokenRows (``lm.`` + clsuite's) mapped back to clsuite's."""
    return {k.removeprefix("lm."): v.data if hasattr(v, "data") else v for k, v in named.items()}


def gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> str:
    """max |a − b| over the parameters, and over them max |a − b| / max |b| (both must name the same parameters)."""
    assert a.keys() == b.keys()
    d = {n: float((a[n].reshape(-1) - b[n].reshape(-1).to(a[n].dtype)).abs().max()) for n in a}
    return f"{max(d.values()):.1e} (scaled {max(d[n] / max(float(b[n].abs().max()), 1e-300) for n in a):.1e})"


def close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float) -> bool:
    """Per parameter, |a − b| ≤ rtol · (|b| + max |b|)."""
    assert a.keys() == b.keys()
    return all(torch.allclose(a[n].reshape(-1), b[n].reshape(-1).to(a[n].dtype), rtol=rtol,
                              atol=rtol * float(b[n].abs().max())) for n in a)


def move(model: nn.Module, seed: int, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def example_grads(wrapper: TokenRows, tok, rows: list[dict], objective) -> list[dict[str, torch.Tensor]]:
    """Each row's gradient of ``objective(out, y)`` alone (plain autograd), by clsuite's parameter names."""
    out = []
    for row in rows:
        x, y = stacked(tok, [row])
        names, params = zip(*wrapper.named_parameters())
        grads = torch.autograd.grad(objective(wrapper(x), y), params)
        out.append(ours(dict(zip(names, grads))))
    return out


def n_targets(tok, rows: list[dict]) -> list[int]:
    return [int((stacked(tok, [r])[1][:, 1:] != -100).sum()) for r in rows]


def pooled(grads: list[dict[str, torch.Tensor]], weights: list[int], reduce) -> dict[str, torch.Tensor]:
    """mean over consecutive pairs of ``reduce(Σ w_i g_i / Σ w_i)``: Avalanche's batch-of-2 estimate from per-example
    gradients, its criterion pooling the pair's target tokens."""
    pairs = [(grads[i:i + 2], weights[i:i + 2]) for i in range(0, len(grads), 2)]
    return {n: sum(reduce(sum(w * g[n] for g, w in zip(gs, ws)) / sum(ws)) for gs, ws in pairs) / len(pairs)
            for n in grads[0]}


# --- EWC ----------------------------------------------------------------------------------------------------
def test_ewc_fisher_equals_avalanches_at_batch_size_one_not_above():
    """clsuite: F = mean_n g_n² (per example). Avalanche: mean over mini-batches of (∇ batch loss)², equal at batch
    size 1; at batch size 2 it is mean_b (Σ n_i g_i / Σ n_i)², n_i the target tokens its criterion pools."""
    model, tok = model_and_tok()
    ewc = plugin_of("ewc")
    fisher = ewc.fisher(context(model, tok, ewc, ROWS), ROWS)
    wrapper = TokenRows(model)
    opt = torch.optim.SGD(wrapper.parameters(), lr=0.1)
    theirs = {bs: ours(EWCPlugin(ewc_lambda=1.0).compute_importances(wrapper, criterion, opt, av_dataset(tok, ROWS),
                                                                      "cpu", batch_size=bs)) for bs in (1, 2)}
    print(f"EWC Fisher, batch size 1: max |diff| {gap(fisher, theirs[1])}")
    assert close(fisher, theirs[1], F32)
    g = example_grads(wrapper, tok, ROWS, criterion)
    want = pooled(g, n_targets(tok, ROWS), torch.square)
    print(f"EWC Fisher, batch size 2: max |diff| to the pooled formula {gap(want, theirs[2])}, "
          f"to clsuite's {gap(fisher, theirs[2])}")
    assert close(want, theirs[2], F32)
    assert not close(fisher, theirs[2], 0.05)  # the definitions differ


@pytest.mark.parametrize("mode", ["separate", "online"])
def test_ewc_penalty_after_two_experiences_equals_avalanches(mode):
    """Both hooks on the same weights and data (Avalanche at batch size 1): the stored Fishers and anchors, then the
    penalty at moved weights; clsuite's (λ/2) Σ F (θ − θ*)² is Avalanche's ewc_lambda Σ F (θ − θ*)² at λ = 2 ewc_lambda."""
    lam, gamma = 3.0, 0.5
    model, tok = model_and_tok()
    ewc = plugin_of(f"ewc(lambda={2 * lam}, samples=8, mode={mode}, gamma={gamma})")
    plugin = EWCPlugin(lam, mode=mode, decay_factor=gamma if mode == "online" else None)
    wrapper = TokenRows(model)
    for exp, rows in enumerate([ROWS, ROWS_B]):
        ewc.after_training_exp(context(model, tok, ewc, rows, exp))
        plugin.after_training_exp(av_strategy(wrapper, tok, rows, 1, exp))
        move(model, seed=exp + 1)
    stored = [(ewc.fishers[i], ewc.anchors[i], ours(plugin.importances[t]), ours(plugin.saved_params[t]))
              for i, t in enumerate([0, 1] if mode == "separate" else [1])]
    for f, a, f_av, a_av in stored:
        assert close(f, f_av, F32) and close(a, a_av, 0.0)
    strategy = av_strategy(wrapper, tok, ROWS, 1, exp=2)
    plugin.before_backward(strategy)
    mine, theirs = ewc.penalty(model).detach(), strategy.loss.detach()
    print(f"EWC penalty ({mode}): {float(mine):.6g}, |diff| {abs(float(mine - theirs)):.1e}, "
          f"Fisher max |diff| {max(gap(f, f_av) for f, _, f_av, _ in stored)}")
    assert float(mine) > 1e-4 and torch.allclose(mine, theirs.to(DT), rtol=1e-6, atol=0)  # Avalanche sums in float32


# --- MAS ----------------------------------------------------------------------------------------------------
def test_mas_importance_equals_avalanches_at_batch_size_one_not_above():
    """clsuite: Ω = mean_n |∇ ‖F(x_n)‖²| (per example, ‖F‖² the squared logits averaged over its target rows).
    Avalanche: mean over mini-batches of |∇ mean_rows ‖F‖²|, pooling the batch's rows: equal at batch size 1."""
    model, tok = model_and_tok()
    mas = plugin_of("mas")
    omega = mas.estimate(context(model, tok, mas, ROWS), ROWS)
    wrapper = TokenRows(model)
    theirs = {bs: ours(MASPlugin()._get_importance(av_strategy(wrapper, tok, ROWS, bs))) for bs in (1, 2)}
    print(f"MAS importance, batch size 1: max |diff| {gap(omega, theirs[1])}")
    assert close(omega, theirs[1], F32)
    g = example_grads(wrapper, tok, ROWS, lambda out, y: out.pow(2).sum(1).mean())  # Avalanche's, written out
    want = pooled(g, n_targets(tok, ROWS), torch.abs)
    print(f"MAS importance, batch size 2: max |diff| to the pooled formula {gap(want, theirs[2])}, "
          f"to clsuite's {gap(omega, theirs[2])}")
    assert close(want, theirs[2], F32)
    assert not close(omega, theirs[2], 0.05)


def test_mas_two_tasks_sum_vs_avalanches_alpha_blend_and_penalty():
    """After two tasks clsuite holds Ω₀ + Ω₁, Avalanche α Ω₀ + (1 − α) Ω₁ (α = 0.5: half of ours); both anchor the
    latest weights, and with λ_avalanche = 2 λ their penalties (λ Σ Ω (θ − θ*)²) agree at moved weights."""
    lam = 0.7
    model, tok = model_and_tok()
    wrapper = TokenRows(model)
    plugin = MASPlugin(lambda_reg=2 * lam, alpha=0.5)
    mas = plugin_of(f"mas(lambda={lam}, samples=8)")
    for exp, rows in enumerate([ROWS, ROWS_B]):
        mas.after_training_exp(context(model, tok, mas, rows, exp))
        plugin.after_training_exp(av_strategy(wrapper, tok, rows, 1, exp))
        if exp == 0:
            move(model, seed=1)
    half = {n: 0.5 * om for n, om in mas.importance.items()}
    assert close(half, ours(plugin.importance), F32)
    assert close(mas.anchor, ours(plugin.params), 0.0)
    move(model, seed=2)
    strategy = av_strategy(wrapper, tok, ROWS, 1, exp=2)
    strategy.loss = torch.ones((), dtype=DT)  # MASPlugin refuses a zero (falsy) loss
    plugin.before_backward(strategy)
    mine, theirs = mas.penalty(model).detach(), strategy.loss.detach() - 1
    print(f"MAS two tasks: Ω/2 max |diff| {gap(half, ours(plugin.importance))}; penalty {float(mine):.6g}, "
          f"|diff| {abs(float(mine - theirs)):.1e}")
    assert float(mine) > 1e-4 and torch.allclose(mine, theirs, rtol=F32, atol=0)  # Avalanche's Ω is float32


# --- SI -------------------------------------------------------------------------------------------------------
def _own_copies(store: dict) -> None:
    """Give Avalanche's SI snapshots their own storage, as ``.cpu()`` of a GPU weight would: on CPU ``param.detach()
    .cpu().flatten()`` is a view of the weight, so the snapshot moves with every step."""
    for t in store.values():
        t.data = t.data.clone()


def test_si_omega_and_penalty_equal_avalanches_on_one_trajectory():
    """Both plugins watch the same 6 SGD steps of a tiny LM, the last two up the gradient (as momentum may overshoot;
    plain SGD descent alone gives u ≥ 0). Avalanche's raw u = −Σ g·Δθ / (Δ² + eps) (minus its
    cum_trajectory) is clsuite's before clamping: clsuite keeps max(0, u), Avalanche min(u, 0.001). With a shared Ω
    and anchor, clsuite's λ Σ Ω (θ − θ̃)² is Avalanche's (si_lambda/2) Σ Ω (θ − θ̃)² at si_lambda = 2 λ. Avalanche as
    it runs on CPU (snapshots aliasing the weights) finds u = 0 everywhere."""
    lam, xi, lr = 0.4, 1e-3, 0.5
    model, tok = model_and_tok()
    si = plugin_of(f"si(lambda={lam}, xi={xi})")
    ctx = context(model, tok, si, ROWS)
    ctx.optimizer = torch.optim.SGD(ctx.trainable_parameters(), lr=lr)
    plugin, as_is = SynapticIntelligencePlugin(si_lambda=2 * lam, eps=xi), SynapticIntelligencePlugin(2 * lam, eps=xi)
    strategy = av_strategy(TokenRows(model), tok, ROWS, 2)
    si.before_training_exp(ctx)
    for p in (plugin, as_is):
        p.before_training_exp(strategy)
    _own_copies(plugin.ewc_data[0])
    for step in range(6):
        rows = [ROWS[(2 * step) % 4], ROWS[(2 * step + 1) % 4]] if step < 4 else ROWS_B[step - 4:step - 2]
        ctx.optimizer.param_groups[0]["maximize"] = step >= 4
        for p in (plugin, as_is):
            p.before_training_iteration(strategy)
        _own_copies(plugin.syn_data["old_theta"])
        ctx.optimizer.zero_grad()
        ctx.loss(rows).backward()
        si.before_update(ctx)
        ctx.optimizer.step()  # clsuite's post-step hook adds −g·Δθ
        for p in (plugin, as_is):
            p.after_training_iteration(strategy)  # Avalanche reads .grad and θ after the step
    si.after_training_exp(ctx)
    for p in (plugin, as_is):
        p.after_training_exp(strategy)
    assert all(not t.data.any() for t in as_is.syn_data["cum_trajectory"].values())
    u = {n: -t.data for n, t in ours(plugin.syn_data["cum_trajectory"]).items()}
    kept = {n: v.clamp(min=0) for n, v in u.items()}
    print(f"SI Ω = max(0, u): max |diff| {gap(si.importance, kept)} "
          f"(max Ω {max(float(o.max()) for o in si.importance.values()):.3g}); "
          f"u < 0 in {sum(int((v < 0).sum()) for v in u.values())}, u > 0.001 in "
          f"{sum(int((v > 1e-3).sum()) for v in u.values())} of {sum(v.numel() for v in u.values())} weights")
    assert close(si.importance, kept, F32)
    assert close(ours(plugin.ewc_data[1]), {n: v.clamp(max=1e-3) for n, v in u.items()}, 0.0)
    assert any((v < 0).any() for v in u.values()) and any((v > 1e-3).any() for v in u.values())  # clamps matter
    assert close(si.anchor, ours(plugin.ewc_data[0]), 0.0)
    for k, imp in plugin.ewc_data[1].items():  # a shared Ω: the penalty's formula is what is compared
        imp.data = si.importance[k.removeprefix("lm.")].reshape(-1).clone()
    move(model, seed=3)
    strategy.clock.train_exp_counter, strategy.loss = 1, torch.zeros((), dtype=DT)
    plugin.before_backward(strategy)
    mine, theirs = si.penalty(model).detach(), strategy.loss.detach()
    print(f"SI penalty: {float(mine):.6g}, |diff| {abs(float(mine - theirs)):.1e}")
    assert float(mine) > 1e-4 and torch.allclose(mine, theirs, rtol=F64, atol=0)


# --- A-GEM ------------------------------------------------------------------------------------------------------
def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_agem_projection_equals_avalanches_given_a_memory_gradient(sign):
    """The same g (a batch's gradient) and g_ref (±another batch's): clsuite's ``project`` and Avalanche's
    ``after_backward`` give the same gradient; exactly one of the two signs conflicts and projects."""
    model, tok = model_and_tok()
    ref = [sign * r for r in torch.autograd.grad(lm_loss(model, collate(tok, ROWS_B, False, 128)),
                                                 list(model.parameters()))]
    model.zero_grad()
    lm_loss(model, collate(tok, ROWS, False, 128)).backward()
    g = _grads(model)
    mine = [t.clone() for t in g.values()]
    projected = project(mine, ref)
    plugin = AGEMPlugin(patterns_per_experience=4, sample_size=4)
    plugin.buffers, plugin.reference_gradients = [None], torch.cat([r.reshape(-1) for r in ref])
    plugin.after_backward(SimpleNamespace(model=model, device="cpu"))
    theirs = _grads(model)
    print(f"A-GEM projection (sign {sign:+.0f}, projected={projected}): max |diff| "
          f"{gap(dict(zip(g, mine)), theirs)}")
    assert close(dict(zip(g, mine)), theirs, F64)
    # the two batches' gradients agree: only the negated one conflicts
    assert projected == any(not torch.equal(g[n], theirs[n]) for n in g) == (sign < 0)


# (memory rows, a current batch whose gradient conflicts with theirs at the seed-0 model)
CONFLICTS = {"same_length": (SAME_LENGTH, [{"prompt": "12", "target": "|>"}]),
             "mixed_length": (ROWS, [{"prompt": "ab", "target": "0"}])}


@pytest.mark.parametrize("memory", list(CONFLICTS))
def test_agem_step_equals_avalanches_on_the_same_memory_batch(memory):
    """clsuite's ``before_update`` (memory batch drawn by its seeded sampler) and Avalanche's
    ``before_training_iteration`` + ``after_backward`` fed those rows: g_ref and the projected gradient agree when
    every memory example has as many target tokens; else Avalanche's g_ref is Σ n_i g_i / Σ n_i, clsuite's mean g_i."""
    rows, current = CONFLICTS[memory]
    model, tok = model_and_tok()
    agem = plugin_of("agem(size=8, sample=4)")
    agem.after_training_exp(context(model, tok, agem, rows))  # the memory holds ``rows``
    ctx = context(model, tok, agem, current, experience=1)
    drawn = agem.memory_batch(ctx.config.seed, ctx.experience, ctx.step)
    params = ctx.trainable_parameters()
    ref = dict(zip(dict(model.named_parameters()), agem.reference_gradient(ctx, drawn, params)))
    model.zero_grad()
    ctx.loss(current).backward()
    g = _grads(model)
    agem.before_update(ctx)
    mine = _grads(model)

    plugin = AGEMPlugin(patterns_per_experience=8, sample_size=4)
    plugin.buffers = [av_dataset(tok, rows)]
    x, y = stacked(tok, drawn)
    plugin.buffer_dliter = iter([(x, y, torch.zeros(len(drawn), dtype=torch.long))])
    wrapper = TokenRows(model)
    strategy = SimpleNamespace(model=wrapper, optimizer=torch.optim.SGD(wrapper.parameters(), lr=0.1),
                               _criterion=criterion, device="cpu")
    plugin.before_training_iteration(strategy)
    ref_av, at = {}, 0
    for n, p in wrapper.named_parameters():
        ref_av[n.removeprefix("lm.")], at = plugin.reference_gradients[at:at + p.numel()].view_as(p), at + p.numel()
    for p, t in zip(model.parameters(), g.values()):
        p.grad = t.clone()
    plugin.after_backward(strategy)
    theirs = _grads(model)
    dot = sum(float((g[n] * ref[n]).sum()) for n in g)
    print(f"A-GEM step ({memory}): g_ref max |diff| {gap(ref, ref_av)}, projected max |diff| "
          f"{gap(mine, theirs)}, g.g_ref {dot:.3g}")
    assert dot < 0 and agem.counts["projected"] == 1  # both project
    if memory == "same_length":
        assert close(ref, ref_av, F32) and close(mine, theirs, F32)
    else:
        per = example_grads(wrapper, tok, drawn, criterion)
        n = n_targets(tok, drawn)
        weighted = {k: sum(w * e[k] for e, w in zip(per, n)) / sum(n) for k in per[0]}
        plain = {k: sum(e[k] for e in per) / len(per) for k in per[0]}
        print(f"  Avalanche g_ref vs token-weighted {gap(ref_av, weighted)}, clsuite's vs plain mean {gap(ref, plain)}")
        assert close(ref_av, weighted, F32) and close(ref, plain, F32)
        assert not close(ref, ref_av, 0.05)


# --- LwF --------------------------------------------------------------------------------------------------------
def _lwf_pair(rows: list[dict], lam: float, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(clsuite's term, Avalanche's LwFPlugin term) on ``rows``: teacher = the weights before ``move``, Avalanche with
    alpha = λ T² and the whole vocabulary as its active units."""
    model, tok = model_and_tok()
    lwf = plugin_of(f"lwf(lambda={lam}, temperature={t})")
    ctx = context(model, tok, lwf, rows, experience=1)
    lwf.before_training_exp(ctx)  # the teacher: a frozen copy of the weights now
    teacher = TokenRows(copy.deepcopy(model)).eval()
    move(model, seed=4, scale=0.3)
    ctx.batch = ctx.collate(rows)
    lm_loss(ctx.model, ctx.batch)  # the engine's forward, whose logits LwF reads
    mine = lwf.before_backward(ctx)
    lwf.after_training_exp(ctx)

    plugin = LwFPlugin(alpha=lam * t * t, temperature=t)
    plugin.lwf.prev_model, plugin.lwf.expcount = teacher, 1
    plugin.lwf.prev_classes_by_task[0] = set(range(model.config.vocab_size))
    wrapper = TokenRows(model)
    x, _ = stacked(tok, rows)
    strategy = SimpleNamespace(mb_x=x, mb_output=wrapper(x), model=wrapper, loss=torch.zeros((), dtype=DT))
    plugin.before_backward(strategy)
    return mine.detach(), strategy.loss.detach()


def test_lwf_distillation_equals_avalanches_per_example_and_per_token_over_a_batch():
    """clsuite: λ T² mean_examples mean_tokens KL; Avalanche: alpha · batchmean KL over the pooled target rows. With
    alpha = λ T² they agree on one example and on a batch of equal target lengths; on mixed lengths Avalanche's is
    the token-weighted mean Σ n_i k_i / Σ n_i of the per-example terms k_i, clsuite's their plain mean."""
    lam, t = 0.5, 2.0
    _, tok = model_and_tok()
    singles = [_lwf_pair([r], lam, t) for r in ROWS]
    for mine, theirs in singles:
        assert float(mine) > 1e-4 and torch.allclose(mine, theirs, rtol=F64, atol=0)
    mine, theirs = _lwf_pair(SAME_LENGTH, lam, t)
    print(f"LwF one example: max |diff| {max(abs(float(a - b)) for a, b in singles):.1e}; equal lengths: "
          f"|diff| {abs(float(mine - theirs)):.1e}")
    assert torch.allclose(mine, theirs, rtol=F64, atol=0)
    mine, theirs = _lwf_pair(ROWS, lam, t)
    k, n = torch.stack([a for a, _ in singles]), torch.tensor(n_targets(tok, ROWS), dtype=DT)
    print(f"LwF mixed lengths: clsuite {float(mine):.6g}, |diff| to mean k {abs(float(mine - k.mean())):.1e}; Avalanche "
          f"{float(theirs):.6g}, |diff| to Σ n k / Σ n {abs(float(theirs - (n * k).sum() / n.sum())):.1e}")
    assert torch.allclose(mine, k.mean(), rtol=F64, atol=0)
    assert torch.allclose(theirs, (n * k).sum() / n.sum(), rtol=F64, atol=0)
    assert not torch.allclose(mine, theirs, rtol=0.01, atol=0)
