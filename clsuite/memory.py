"""What a run holds in memory: the settings that shrink it (bf16 weights with an fp32 master copy, activation
checkpointing), the peak a run measures, and the plan that estimates that peak per process, component by component
(docs/memory.md)."""
from __future__ import annotations

import inspect
import os
import resource
import sys
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Iterator, Literal

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .errors import UserError, did_you_mean

if TYPE_CHECKING:
    from .config import TrainConfig
    from .strategy import Strategy


# --- settings that shrink it ---------------------------------------------------------------------------------------
def autocast_enabled(train: TrainConfig) -> bool:
    """Whether training forward passes run under ``torch.autocast(bfloat16)``: with bf16 weights too, so that the
    ops autocast keeps in float32 (softmax, losses) stay there."""
    return train.precision in ("bf16", "bf16-weights")


def prepare_model(model: torch.nn.Module, train: TrainConfig) -> torch.nn.Module:
    """The model as ``train`` asks, before anything reads its weights: floating-point parameters in bfloat16 under
    ``precision=bf16-weights`` (buffers such as RoPE's frequencies kept), HF gradient checkpointing under
    ``activation_checkpointing``."""
    if train.precision == "bf16-weights":
        with torch.no_grad():
            for p in model.parameters():
                if p.is_floating_point():
                    p.data = p.data.to(torch.bfloat16)
    if train.activation_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise UserError(f"activation_checkpointing=true, but {type(model).__name__} has no gradient "
                            "checkpointing (transformers' gradient_checkpointing_enable): set it to false")
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the older name is deprecated
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


class MasterWeights:
    """fp32 master copies of the bfloat16 parameters among ``params``. Inside ``stepping()`` each such parameter
    holds its master and an fp32 gradient, so clipping and the optimizer (its state keyed by the parameter, in fp32)
    work in fp32; on leaving, it holds the master rounded to bfloat16 again and no gradient."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.pairs = [(p, p.detach().to(torch.float32, copy=True)) for p in params if p.dtype == torch.bfloat16]

    @contextmanager
    def stepping(self) -> Iterator[None]:
        for p, master in self.pairs:
            grad, p.grad = p.grad, None
            p.data = master  # the bf16 weights are freed here; the optimizer updates the master in place
            p.grad = None if grad is None else grad.to(torch.float32)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, master in self.pairs:
                    p.grad = None
                    p.data = master.to(torch.bfloat16)


# --- measured peaks --------------------------------------------------------------------------------------------
_STATUS = "/proc/self/status"
_rss_reset = False  # whether the kernel accepted the last reset of the peak RSS


def reset_peak(device: torch.device) -> None:
    """Start a new peak: CUDA's allocator statistics; on the CPU the kernel's peak RSS (``/proc/self/clear_refs``)."""
    global _rss_reset
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5: reset the peak resident set size (VmHWM) only
        _rss_reset = True
    except OSError:
        _rss_reset = False


def measured_peak(device: torch.device) -> tuple[str, int | None]:
    """(what was measured, bytes) since ``reset_peak``: ``cuda_max_allocated`` (torch.cuda.max_memory_allocated,
    tensors only); on the CPU ``cpu_peak_rss`` (the process's peak resident memory: Python, libraries and data
    included), or ``cpu_peak_rss_since_start`` where the reset was refused; ``none`` on other devices."""
    if device.type == "cuda":
        return "cuda_max_allocated", int(torch.cuda.max_memory_allocated(device))
    if device.type != "cpu":
        return "none", None
    if os.path.exists(_STATUS):
        with open(_STATUS) as f:
            hwm = next((line for line in f if line.startswith("VmHWM:")), None)
        if hwm is not None:
            return ("cpu_peak_rss" if _rss_reset else "cpu_peak_rss_since_start"), int(hwm.split()[1]) * 1024
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return "cpu_peak_rss_since_start", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def peak_per_process(device: torch.device, train: TrainConfig) -> dict[str, Any]:
    """An experience's log entries: ``peak_memory`` (what was measured), ``peak_memory_bytes`` ([bytes on rank 0,
    1, ...] since ``reset_peak``; None for a rank that measured nothing) and ``activation_checkpointing`` (which the
    config leaves out). Every rank takes part."""
    from . import distributed as dist
    what, peak = measured_peak(device)
    every = torch.zeros(dist.world_size(), dtype=torch.float64)
    every[dist.rank()] = -1 if peak is None else peak
    dist.all_reduce_sum_([every])
    return {"peak_memory": what, "peak_memory_bytes": [None if x < 0 else int(x) for x in every.tolist()],
            "activation_checkpointing": train.activation_checkpointing}


class TensorPeak(TorchDispatchMode):
    """Live bytes of the tensor storages that ops inside it create (and of those given to ``track``), and their
    peak: on the CPU what ``torch.cuda.max_memory_allocated`` is on a GPU, without the allocator's rounding. For
    measuring (perf/, tests), not for runs: every op pays a Python call. Storage resizes are not seen."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, weakref.ref] = {}

    def track(self, tensors: Any) -> None:
        """Count tensors made before entering (parameters, buffers, optimizer state)."""
        for t in tree_leaves(tensors):
            if isinstance(t, torch.Tensor):
                self._add(t)
        self.peak = max(self.peak, self.live)

    def _add(self, t: torch.Tensor) -> None:
        if t.device.type == "meta":
            return
        st = t.untyped_storage()
        key = id(st)
        if key in self._refs:
            return
        size = st.nbytes()
        self._refs[key] = weakref.ref(st, partial(self._gone, key, size))
        self.live += size

    def _gone(self, key: int, size: int, _ref: Any) -> None:
        if self._refs.pop(key, None) is not None:
            self.live -= size

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._add(t)
        self.peak = max(self.peak, self.live)
        return out


# --- the plan: shapes ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    """What the plan reads of a decoder-only model: its sizes and every linear layer's (name, in, out)."""
    name: str
    source: str  # where the shape came from
    parameters: int  # every parameter once (tied embeddings once)
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    layer_parameters: int  # one decoder layer's
    largest_tensor: int  # elements of the largest parameter
    tied: bool  # the head shares the embedding's weight
    linears: tuple[tuple[str, int, int], ...] = ()

    @property
    def root_parameters(self) -> int:
        """Parameters outside the decoder layers: embeddings, final norm, head."""
        return self.parameters - self.layers * self.layer_parameters


# Hub models whose configs the plan knows offline (from their config.json): aliases -> key of KNOWN_CONFIGS.
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "llama-2-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False,
                       max_position_embeddings=4096),
    "llama-2-13b": dict(model_type="llama", hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                        num_attention_heads=40, num_key_value_heads=40, vocab_size=32000, tie_word_embeddings=False,
                        max_position_embeddings=4096),
}
KNOWN_ALIASES: dict[str, str] = {
    "meta-llama/Llama-2-7b-hf": "llama-2-7b", "meta-llama/Llama-2-7b-chat-hf": "llama-2-7b",
    "NEU-HAI/Llama-2-7b-alpaca-cleaned": "llama-2-7b",
    "meta-llama/Llama-2-13b-hf": "llama-2-13b", "meta-llama/Llama-2-13b-chat-hf": "llama-2-13b",
}


def shape_of(model: torch.nn.Module, name: str, source: str) -> ModelShape:
    """The shape of a built model (real or on the meta device)."""
    cfg = model.config
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
               if getattr(cfg, k, None) is None]
    if missing:
        raise UserError(f"model {name!r} ({type(model).__name__}) has no {', '.join(missing)} in its config: the plan "
                        "knows decoder-only transformers (Llama, Qwen, Mistral, ...)")
    layers = _decoder_layers(model)
    heads = cfg.num_attention_heads
    return ModelShape(
        name=name, source=source, parameters=sum(p.numel() for p in model.parameters()),
        layers=cfg.num_hidden_layers, hidden=cfg.hidden_size,
        intermediate=getattr(cfg, "intermediate_size", None) or 4 * cfg.hidden_size, heads=heads,
        kv_heads=getattr(cfg, "num_key_value_heads", None) or heads, vocab=cfg.vocab_size,
        layer_parameters=max((sum(p.numel() for p in m.parameters()) for m in layers), default=0),
        largest_tensor=max(p.numel() for p in model.parameters()),
        tied=bool(getattr(cfg, "tie_word_embeddings", False)),
        linears=tuple((n, m.in_features, m.out_features) for n, m in model.named_modules()
                      if isinstance(m, torch.nn.Linear)))


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks: the longest ModuleList in the model."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def _meta_model(config: Any) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def model_shape(model_id: str) -> ModelShape:
    """The shape of a known config (``KNOWN_CONFIGS``, by name or hub id), a registered model (built), a local
    directory (its config.json, on the meta device) or a hub id (its config, which needs the internet)."""
    from transformers import AutoConfig
    from .models import MODELS, load_model
    key = KNOWN_ALIASES.get(model_id, model_id)
    if key in KNOWN_CONFIGS:
        conf = AutoConfig.for_model(**KNOWN_CONFIGS[key])
        return shape_of(_meta_model(conf), model_id, f"known config {key}")
    if model_id in MODELS:
        model, _ = load_model(model_id)
        return shape_of(model, model_id, "registered model")
    try:
        conf = AutoConfig.from_pretrained(model_id)
    except (OSError, ValueError) as e:
        known = [*KNOWN_CONFIGS, *MODELS.names()]
        raise UserError(f"cannot read the config of model {model_id!r} ({str(e).splitlines()[0]}): "
                        f"{did_you_mean(model_id, known)}give a local model directory, a registered model or a "
                        f"known config ({', '.join(known)})") from None
    where = "local config" if os.path.isdir(model_id) else "hub config"
    return shape_of(_meta_model(conf), model_id, where)


# --- the plan: what strategies declare -------------------------------------------------------------------------
When = Literal["always", "pass", "update", "step"]
Moment = Literal["pass", "end", "step"]
Where = Literal["device", "host"]


@dataclass(frozen=True)
class State:
    """State a strategy holds, as its ``memory_state`` declares it: ``elements`` numbers in ``dtype`` ("param": the
    weights' dtype; "fp32": float32 at least), ``where`` it lives, ``when`` it is held (always; during the training
    passes only; by an update rule from its first pass's gradient to the end of its last pass; during the optimizer
    step only), and whether FSDP shards it with the parameters."""
    what: str
    elements: int
    dtype: Literal["param", "fp32"] = "param"
    where: Where = "device"
    when: When = "always"
    sharded: bool = True


@dataclass(frozen=True)
class Trainable:
    """What the optimizer trains under a parametrization (``memory_trainable``): elements and their dtype."""
    elements: int
    dtype: Literal["param", "fp32"] = "param"


@dataclass(frozen=True)
class RunShape:
    """What a strategy's ``memory_state`` reads: the model, the trainable elements, the stream and the batch."""
    model: ModelShape
    trainable: int
    tasks: int  # experiences of the stream
    general: bool  # whether the stream has general data
    plugins: tuple[Any, ...]  # the composed strategies (instances, with their params)
    micro_batch: int  # examples per micro-batch on one process
    micro_batches: int  # micro-batches per optimizer step (grad_accum)
    tokens: int  # tokens per example
    head_positions: int  # positions per example whose logits are computed

    def plugin(self, name: str) -> Any:
        """The composed strategy named ``name``, or None."""
        return next((p for p in self.plugins if p.name == name), None)


def quadratic_penalty(run: RunShape, pairs: int, what: str = "θ − θ*") -> list[State]:
    """What a penalty Σ w (θ − θ*)² over ``pairs`` stored (w, θ*) holds during the passes
    (``clsuite.strategies._anchored.quadratic_sum``): the θ − θ* its graph keeps, its backward's temporaries."""
    if not pairs:
        return []
    return [State(f"{what} that the penalty's graph keeps", pairs * run.trainable, "fp32", when="pass"),
            State("the penalty's backward temporaries (two of the largest tensor)",
                  2 * min(run.model.largest_tensor, run.trainable), "fp32", when="pass")]


def lora_targets(shape: ModelShape, targets: list[str] | str) -> list[tuple[str, int, int]]:
    """The linear layers a LoRA adapter with ``target_modules`` adapts (PEFT's suffix match; ``all-linear``: every
    linear layer but the output head)."""
    if targets == "all-linear":
        head = shape.linears[-1][0] if shape.linears else None
        return [x for x in shape.linears if x[0] != head]
    return [x for x in shape.linears if any(x[0] == t or x[0].endswith("." + t) for t in targets)]


# --- the plan: the estimate ----------------------------------------------------------------------------------------
# Bytes autograd keeps per token per decoder layer of a Llama-type block (RMSNorm, SDPA attention, SwiGLU MLP) as
# coefficients of the hidden size, the intermediate size, the heads (log-sum-exp) and the sequence length (the mask
# SDPA is given), plus a constant (the norms' scales); and per token of the residual stream a checkpointed layer
# keeps. Measured with TensorPeak on transformers' LlamaForCausalLM (docs/memory.md); perf/memory_plan.py checks them.
ACTIVATION_BYTES: dict[str, dict[str, float]] = {
    "fp32": {"hidden": 40, "intermediate": 16, "heads": 4, "sequence": 4, "constant": 8, "checkpoint": 4},
    "bf16": {"hidden": 34, "intermediate": 8, "heads": 4, "sequence": 2, "constant": 8, "checkpoint": 4},
    "bf16-weights": {"hidden": 24, "intermediate": 8, "heads": 4, "sequence": 2, "constant": 8, "checkpoint": 2},
}
HEAD_BYTES = 12  # per logit at the head's backward: float32 log-softmax kept, its gradient and the logits' gradient
LAYER_GRAD_BYTES = 8  # per token and intermediate width: the activation gradients of the layer being back-propagated
# float32 state tensors per trainable parameter of each torch.optim class (as make_optimizer builds it: no momentum)
OPTIMIZER_STATES: dict[str, int] = {"AdamW": 2, "Adam": 2, "NAdam": 2, "RAdam": 2, "Adamax": 2, "Adadelta": 2,
                                    "Rprop": 2, "RMSprop": 1, "Adagrad": 1, "ASGD": 1, "SGD": 0}
BUCKET = 1 << 25  # elements of the engine's flat all-reduce buffer (clsuite.distributed), float32


@dataclass(frozen=True)
class Line:
    """One component of a plan: its bytes on one process at the backward pass's start (``pass_bytes``: activations
    all saved), at its end (``end_bytes``: the gradient complete, SAM's copy still held, no activations) and at the
    optimizer step (``step_bytes``); None where unknown."""
    component: str
    pass_bytes: int | None
    step_bytes: int | None
    where: Where = "device"
    note: str = ""
    end_bytes: int | None = 0

    def at(self, moment: Moment) -> int | None:
        return {"pass": self.pass_bytes, "end": self.end_bytes, "step": self.step_bytes}[moment]


@dataclass(frozen=True)
class Plan:
    """The estimate of one process's memory, line by line."""
    model: ModelShape
    strategy: str
    processes: int
    parallel: str
    train: TrainConfig
    micro_batch: int
    tokens: int
    lines: list[Line] = field(default_factory=list)
    moments: tuple[Moment, ...] = ("pass", "end", "step")

    def unknown(self) -> list[Line]:
        return [x for x in self.lines if any(x.at(m) is None for m in self.moments)]

    def total(self, moment: Moment, where: tuple[Where, ...] = ("device",)) -> int:
        """Bytes at one moment, over the known lines."""
        return sum(x.at(moment) or 0 for x in self.lines if x.where in where)

    def peak(self, where: tuple[Where, ...] = ("device",)) -> int:
        """The estimated peak: the largest of the moments (known lines only: see ``unknown``)."""
        return max(self.total(m, where) for m in self.moments)

    def peak_moment(self, where: tuple[Where, ...] = ("device",)) -> Moment:
        return max(self.moments, key=lambda m: self.total(m, where))


def _bytes(dtype: str, param_bytes: int) -> int:
    return param_bytes if dtype == "param" else 4


def activation_bytes(shape: ModelShape, precision: str, micro_batch: int, tokens: int, head_positions: int,
                     checkpointing: bool) -> tuple[int, int]:
    """Bytes of one micro-batch's activations at the backward pass: (what the layers and embeddings keep, the larger of
    the head's logits with their gradients and one layer's activation gradients); with checkpointing, the layers'
    inputs plus one layer recomputed."""
    c = ACTIVATION_BYTES[precision]
    h = shape.hidden
    layer = (c["hidden"] * h + c["intermediate"] * shape.intermediate + c["heads"] * shape.heads
             + c["sequence"] * tokens + c["constant"])
    stream = c["checkpoint"] * h  # the residual stream per token: the embeddings' output, a layer's input
    if checkpointing:
        body = shape.layers * stream + layer
    else:
        body = shape.layers * layer + stream
    final_norm = 2 * c["checkpoint"] * h
    per_token = body + final_norm
    head = HEAD_BYTES * shape.vocab * head_positions
    layer_grads = LAYER_GRAD_BYTES * shape.intermediate * tokens
    return int(micro_batch * tokens * per_token), int(micro_batch * max(head, layer_grads))


def plan_memory(shape: ModelShape, train: TrainConfig, spec: str, processes: int = 1, parallel: str = "ddp",
                tasks: int = 1, general: bool = False, tokens: int | None = None, head_positions: int | None = None,
                device: str = "cuda") -> Plan:
    """The memory of one of ``processes`` processes training ``spec`` on ``shape`` with ``train``'s settings:
    replicated (``ddp``: the engine's gradient all-reduce) or sharded by the number of processes (``fsdp``).
    ``tokens``: per example (default ``max_length``, an upper bound: batches pad to their longest row);
    ``head_positions``: positions with logits (default ``tokens``); ``device``: an optimizer without a fused kernel steps
    with foreach on ``cuda`` (one temporary copy of the state's size), one tensor at a time on ``cpu``."""
    from .strategy import build_strategy, canonical_spec
    if processes < 1:
        raise UserError(f"--processes {processes}: give at least 1")
    if parallel not in ("ddp", "fsdp"):
        raise UserError(f"--parallel {parallel!r}: choose ddp or fsdp")
    unit = processes * train.grad_accum
    if train.batch_size % unit:
        raise UserError(f"batch_size {train.batch_size} is not a multiple of {processes} processes × grad_accum "
                        f"{train.grad_accum}: set --set grad_accum=... so that each process gets whole micro-batches")
    plugins = tuple(build_strategy(spec))
    if parallel == "fsdp":
        from .sharding import check_training
        check_training(train, plugins)  # what a sharded run refuses, refused here too
    tokens = tokens or train.max_length
    lines: list[Line] = []
    trainable = _trainable(shape, plugins, lines)
    run = RunShape(shape, trainable.elements if trainable else shape.parameters, tasks, general, plugins,
                   train.batch_size // unit, train.grad_accum, tokens, head_positions or tokens)
    n = processes if parallel == "fsdp" else 1
    lines += _training_lines(run, train, trainable, n, device)
    for p in plugins:
        lines += _plugin_lines(p, run, 2 if train.precision == "bf16-weights" else 4, n)
    lines += _activation_lines(run, train, trainable, n)
    lines += _parallel_lines(run, train, processes, parallel)
    return Plan(shape, canonical_spec(spec), processes, parallel, train, run.micro_batch, tokens, lines)


def _line(component: str, pass_b: float | None, step_b: float | None, where: Where = "device", note: str = "",
          end: float | None = 0) -> Line:
    def whole(x: float | None) -> int | None:
        return None if x is None else int(x)
    return Line(component, whole(pass_b), whole(step_b), where, note, whole(end))


def _trainable(shape: ModelShape, plugins: tuple[Strategy, ...], lines: list[Line]) -> Trainable | None:
    """What the optimizer trains: every parameter, or what the parametrization declares (None, with an unknown line,
    when it declares nothing)."""
    for p in plugins:
        if p.kind == "parametrization":
            declared = getattr(p, "memory_trainable", None)
            if declared is None:
                lines.append(Line(f"{p.name}: trainable parameters", None, None,
                                  note="unknown: the parametrization declares no memory_trainable", end_bytes=None))
                return None
            return declared(shape)
    return Trainable(shape.parameters)


def _training_lines(run: RunShape, train: TrainConfig, trainable: Trainable | None, n: int,
                    device: str) -> list[Line]:
    """Weights, the fp32 master copy, gradients, the optimizer's state and its step's temporaries."""
    shape, pb = run.model, 2 if train.precision == "bf16-weights" else 4
    known = trainable is not None
    t_el = run.trainable if known else None
    gb = _bytes(trainable.dtype, pb) if known else pb
    master = t_el if known and pb == 2 and trainable.dtype == "param" else 0
    out = [_line("weights", shape.parameters * pb / n, (shape.parameters - master) * pb / n,
                 note=f"{shape.parameters / 1e6:.1f}M parameters in {'bf16' if pb == 2 else 'fp32'}"
                      + (f", a 1/{n} shard" if n > 1 else "")
                      + ("; the trainable ones give way to their masters in the step" if master else ""),
                 end=shape.parameters * pb / n)]
    if master:
        out.append(_line("fp32 master copy", master * 4 / n, master * 4 / n, note="what the optimizer steps",
                         end=master * 4 / n))
    grads = None if t_el is None else (master * 4 + (t_el - master) * gb) / n
    out.append(_line("gradients", (t_el * gb / n if train.grad_accum > 1 else 0) if known else None, grads,
                     note="; ".join([*(["fp32 at the step, bf16 in the passes"] if master else []),
                                     "held across micro-batches" if train.grad_accum > 1
                                     else "freed before each pass"]),
                     end=None if t_el is None else t_el * gb / n))
    if shape.tied and known and trainable.elements == shape.parameters:
        out.append(_line("tied embedding's gradient sum", 0, 0, end=2 * shape.vocab * shape.hidden * gb / n,
                         note="the head's and the embedding's gradients of the shared weight, added at the end"))
    states = OPTIMIZER_STATES.get(train.optimizer)
    name = f"optimizer state ({train.optimizer})"
    if states is None:
        return out + [_line(name, None, None, note=f"unknown optimizer: the plan knows {', '.join(OPTIMIZER_STATES)}",
                            end=None)]
    state = None if t_el is None else t_el * states * 4 / n
    out.append(_line(name, state, state, note=f"{states} fp32 tensors per trainable parameter", end=state))
    if t_el is not None and states:
        if fused(getattr(torch.optim, train.optimizer, None)):
            out.append(_line("optimizer step temporaries", 0, 0, note="fused: updated in place"))
        else:
            temp = (t_el / n if device == "cuda" else 2 * min(shape.largest_tensor, t_el)) * 4
            out.append(_line("optimizer step temporaries", 0, temp, note="foreach: one state-sized copy"
                             if device == "cuda" else "one tensor at a time: two of the largest"))
    return out


def fused(cls: Any) -> bool:
    """Whether the engine steps optimizer class ``cls`` fused (torch has a fused kernel for it: AdamW, Adam, SGD,
    Adagrad): no temporaries, 0.23-0.31x the CPU time of its default loop on SmolLM2 (README, Performance)."""
    return isinstance(cls, type) and "fused" in inspect.signature(cls).parameters


def _activation_lines(run: RunShape, train: TrainConfig, trainable: Trainable | None, n: int) -> list[Line]:
    """Activations, the backward workspace with the head's weight gradient, autocast's weight copies."""
    shape = run.model
    body, workspace = activation_bytes(shape, train.precision, run.micro_batch, run.tokens, run.head_positions,
                                       train.activation_checkpointing)
    out = [_line("activations", body, 0, note=f"micro-batch {run.micro_batch} × {run.tokens} tokens, "
                 f"{shape.layers} layers" + (", checkpointed" if train.activation_checkpointing else ""))]
    full = trainable is not None and trainable.elements == shape.parameters  # the head trains (no adapter)
    head_grad = shape.vocab * shape.hidden * (2 if train.precision == "bf16-weights" else 4) / n if full else 0
    out.append(_line("backward workspace", workspace + head_grad, 0,
                     note=f"logits of {run.micro_batch} × {run.head_positions} × {shape.vocab} and their gradients, "
                          "or one layer's activation gradients"
                          + ("; the head's weight gradient" if head_grad else "")))
    if train.precision == "bf16":  # whole under FSDP too: the copies of the gathered weights outlive the resharding
        linear = sum(i * o for _, i, o in shape.linears)
        out.append(_line("autocast's bf16 weight copies", linear * 2, 0,
                         note="of every linear layer, kept for the backward pass"))
    return out


def _parallel_lines(run: RunShape, train: TrainConfig, processes: int, parallel: str) -> list[Line]:
    """DDP's all-reduce buffer, or what FSDP gathers in full."""
    if processes == 1:
        return []
    shape, pb = run.model, 2 if train.precision == "bf16-weights" else 4
    if parallel == "ddp":
        return [_line("all-reduce buffer", 0, min(run.trainable, BUCKET) * 4,
                      note="flat fp32 bucket of clsuite.distributed")]
    gathered = (shape.root_parameters + 2 * shape.layer_parameters) * pb + shape.layer_parameters * pb
    return [_line("FSDP gathered parameters", gathered, 0, note="in full: embeddings and head, two decoder layers "
                  "(one prefetched), one layer's gradient")]


_HELD = {"always": "", "pass": "held at the backward start", "step": "held during the optimizer step",
         "update": "held from the first pass's gradient to the end of the last pass"}


def _plugin_lines(plugin: Strategy, run: RunShape, pb: int, n: int) -> list[Line]:
    """The lines of one strategy's declared state, or one 'unknown' line when it declares none."""
    declare = getattr(plugin, "memory_state", None)
    if declare is None:
        return [Line(f"{plugin.name}: its state", None, None,
                     note="unknown: the strategy declares no memory_state (see docs/memory.md)", end_bytes=None)]
    out = []
    for s in declare(run):
        size = s.elements * _bytes(s.dtype, pb) / (n if s.sharded else 1)
        held = {"always": (1, 1, 1), "pass": (1, 0, 0), "update": (1, 1, 0), "step": (0, 0, 1)}[s.when]
        out.append(_line(f"{plugin.name}: {s.what}", held[0] * size, held[2] * size, s.where, note=_HELD[s.when],
                         end=held[1] * size))
    if not out:
        out.append(Line(f"{plugin.name}: nothing beyond the model", 0, 0))
    return out
