"""clsuite.avalanche.SAMPlugin against SAM written out in plain torch, beside Avalanche's EWC, and the README example."""
import re
from pathlib import Path

import pytest
import torch
from avalanche.benchmarks.scenarios.supervised import class_incremental_benchmark
from avalanche.core import SupervisedPlugin
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin, EWCPlugin
from torch.func import functional_call
from torch.utils.data import TensorDataset

from clsuite.avalanche import SAMPlugin
from clsuite.errors import UserError

LR, RHO = 0.1, 0.05
pytestmark = pytest.mark.filterwarnings("ignore:No loggers specified")


def _bench():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 5, generator=g, dtype=torch.float64), torch.arange(48) % 4
    return class_incremental_benchmark({"train": TensorDataset(x, y), "test": TensorDataset(x, y)},
                                       class_order=[0, 1, 2, 3], num_experiences=2)


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4)).double()


def _strategy(model: torch.nn.Module, plugins: list, epochs: int = 1) -> Naive:
    return Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR), train_mb_size=8,
                 train_epochs=epochs, plugins=plugins, evaluator=EvaluationPlugin(loggers=[]))


def _weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


class Spy(SupervisedPlugin):
    """Each iteration's batch and weights (at its start and before the update); each ``before_backward``'s weights and
    loss (put it after the plugins whose penalty it should see)."""

    def __init__(self):
        super().__init__()
        self.batches, self.at_start, self.at_update, self.calls = [], [], [], []

    def before_training_iteration(self, strategy, **kwargs):
        self.batches.append((strategy.mb_x.clone(), strategy.mb_y.clone()))
        self.at_start.append(_weights(strategy.model))

    def before_backward(self, strategy, **kwargs):
        self.calls.append((_weights(strategy.model), float(strategy.loss.detach())))

    def before_update(self, strategy, **kwargs):
        self.at_update.append(_weights(strategy.model))


def _loss(model, ws, x, y):
    names = [n for n, _ in model.named_parameters()]
    return torch.nn.functional.cross_entropy(functional_call(model, dict(zip(names, ws)), (x,)), y)


def _independent(model, w, batches, penalty=None, penalty_at_e=True, adaptive=False, rho=RHO, eta=0.01):
    """SGD with SAM written out: g at w, e = rho g/||g|| (ASAM: rho T^2 g/||T g||, T = |w| + eta), w -= lr g(w + e)."""
    w = [t.clone() for t in w]
    for x, y in batches:
        def grad(ws, with_penalty):
            ws = [t.clone().requires_grad_() for t in ws]
            loss = _loss(model, ws, x, y) + (penalty(ws) if penalty and with_penalty else 0)
            return torch.autograd.grad(loss, ws)
        g = grad(w, True)
        if rho:
            t = [p.abs() + eta if adaptive else torch.ones_like(p) for p in w]
            norm = torch.sqrt(sum(((ti * gi) ** 2).sum() for ti, gi in zip(t, g)))
            g = grad([p + rho * ti * ti * gi / norm for p, ti, gi in zip(w, t, g)], penalty_at_e)
        w = [p - LR * gi for p, gi in zip(w, g)]
    return w


def _close(a, b) -> bool:
    return all(torch.allclose(x, y, rtol=1e-10, atol=1e-12) for x, y in zip(a, b))


def _gap(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


@pytest.mark.parametrize("adaptive", [False, True])
def test_weights_after_k_steps_equal_sam_written_out(adaptive):
    model, spy = _mlp(), Spy()
    start = _weights(model)
    rho = 0.5 if adaptive else RHO
    strategy = _strategy(model, [SAMPlugin(rho=rho, adaptive=adaptive), spy], epochs=2)
    strategy.train(_bench().train_stream[0])
    assert len(spy.batches) == 6  # 24 examples, batches of 8, 2 epochs
    got = _weights(model)
    assert _close(got, _independent(model, start, spy.batches, adaptive=adaptive, rho=rho))
    assert _gap(got, _independent(model, start, spy.batches, rho=0)) > 1e-4  # not plain SGD
    assert len(spy.calls) == 2 * len(spy.batches)  # before_backward in both passes
    assert all(_gap(w, a) > 0 for (w, _), a in zip(spy.calls[1::2], spy.at_start))  # pass 2 at w + e
    assert all(torch.equal(u, s) for us, ss in zip(spy.at_update, spy.at_start) for u, s in zip(us, ss))  # restored
    assert "backward" not in vars(strategy)  # the wrapper is gone after training


def test_ewc_penalty_is_in_the_pass_at_perturbed_weights():
    model, spy, lam = _mlp(), Spy(), 50.0
    ewc = EWCPlugin(ewc_lambda=lam)
    strategy = _strategy(model, [SAMPlugin(rho=RHO), ewc, spy])
    bench = _bench()
    strategy.train(bench.train_stream[0])
    start = _weights(model)
    imp = [ewc.importances[0][n].data.clone() for n, _ in model.named_parameters()]
    anchor = [ewc.saved_params[0][n].data.clone() for n, _ in model.named_parameters()]

    def penalty(ws):
        return lam * sum((i * (w - a) ** 2).sum() for i, w, a in zip(imp, ws, anchor))

    done, calls = len(spy.batches), len(spy.calls)
    strategy.train(bench.train_stream[1])
    batches, passes = spy.batches[done:], spy.calls[calls:]
    got = _weights(model)
    assert _close(got, _independent(model, start, batches, penalty))
    assert _gap(got, _independent(model, start, batches, penalty, penalty_at_e=False)) > 1e-4
    assert len(batches) == 3 and len(passes) == 6
    for (x, y), (w, first), (we, second) in zip(batches, passes[::2], passes[1::2]):
        assert first == pytest.approx(float(_loss(model, w, x, y) + penalty(w)), rel=1e-6)  # EWC sums in float32
        assert second == pytest.approx(float(_loss(model, we, x, y) + penalty(we)), rel=1e-6)
        assert float(penalty(we)) != pytest.approx(float(penalty(w)), rel=1e-6)


def test_non_finite_gradient_stops_training():
    model = _mlp()
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="not finite at training iteration 0: lower the learning rate"):
        _strategy(model, [SAMPlugin()]).train(_bench().train_stream[0])


def test_bad_rho_is_a_user_error_and_asam_defaults_to_its_radius():
    with pytest.raises(UserError, match="SAMPlugin: rho: "):
        SAMPlugin(rho=-1.0)
    assert SAMPlugin().rho == 0.05 and SAMPlugin(adaptive=True).rho == 0.5


def test_readme_example_runs_as_written():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("### Avalanche users", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    assert any(isinstance(p, SAMPlugin) for p in ns["strategy"].plugins)
