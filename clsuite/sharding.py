"""Sharded data parallelism (``--set parallel=fsdp``): torch's ``fully_shard`` (FSDP2) per decoder layer, norms and
dot products over every shard, EWC's Fisher and penalty over shards (docs/distributed.md)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import torch
import torch.distributed as tdist

from . import distributed as dist
from .errors import DivergenceError, UserError
from .numerics import at_least_float32

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor

    from .config import RunConfig, TrainConfig
    from .engine import Context
    from .strategy import Strategy

# Built-in strategies that run sharded: their tensors are sharded like the weights, or they hold none of them.
# A plugin of a third party declares ``fsdp_ready = True`` when it does the same.
SUPPORTED = ("naive", "joint", "replay", "sam", "asam", "looksam", "sssam", "aesam", "msam", "ewc", "wiseft", "lora")
_FLOAT_SUMS = (torch.float32, torch.bfloat16)  # reduce dtypes FSDP sums without dividing first (see _Squaring)


def sharded(cfg: RunConfig) -> bool:
    """Whether the run shards its model over the processes (``parallel=fsdp``)."""
    return cfg.train.parallel == "fsdp"


def check(cfg: RunConfig, plugins: Sequence[Strategy], save: bool = False) -> None:
    """A UserError unless this run can train sharded (nothing to check without ``parallel=fsdp``); ``save``: the
    run saves its final model."""
    if not sharded(cfg):
        return
    if dist.world_size() < 2:
        raise UserError("parallel=fsdp shards the model over processes and this is one process: launch it with "
                        "torchrun --nproc_per_node N (N >= 2), or drop --set parallel=fsdp")
    check_training(cfg.train, plugins)
    if cfg.eval.sharpness != "off":
        raise UserError(f"--sharpness {cfg.eval.sharpness} does not run under parallel=fsdp (its Hessian-vector "
                        "products need whole parameters): use --sharpness off, or parallel=ddp")
    if save:
        raise UserError("--save-model does not run under parallel=fsdp (each process holds a shard of the weights): "
                        "drop --save-model, or use parallel=ddp")


def check_training(train: TrainConfig, plugins: Sequence[Strategy]) -> None:
    """A UserError unless ``plugins`` and ``train``'s precision run sharded (also what ``clsuite plan`` refuses)."""
    for p in plugins:
        if not (p.name in SUPPORTED or getattr(p, "fsdp_ready", False)):
            raise UserError(f"strategy {p.name or type(p).__name__!r} does not run under parallel=fsdp (its state is "
                            f"not sharded with the weights); these do: {', '.join(SUPPORTED)}; or use parallel=ddp")
        if p.name == "lora" and p.params.mode != "continue":
            raise UserError("lora(mode=merge) does not run under parallel=fsdp (a fresh adapter merged into sharded "
                            "weights after each task); use lora (mode=continue), or parallel=ddp")
    if train.precision == "bf16-weights":
        raise UserError("precision=bf16-weights does not run under parallel=fsdp (its fp32 master copies replace the "
                        "parameters FSDP shards): use precision=bf16 (autocast) or fp32, or parallel=ddp")


def record_fields(cfg: RunConfig) -> dict[str, str]:
    """What a record says beside ``world_size`` about how the processes split the work: ``parallel`` under fsdp."""
    return {"parallel": "fsdp"} if sharded(cfg) else {}


# --- sharding the model -------------------------------------------------------------------------------------------
class _Squaring:
    """FSDP's gradient reduce-scatter (its ``ReduceScatter`` interface: ``allocate`` and the call), which while
    ``square`` is set squares each process's gradient before summing it over processes: each process gets its shard of
    Σ_processes g² (EWC's Fisher) instead of the mean of g. FSDP divides nothing before the reduce-scatter for float32
    and bfloat16 gradients, the only ones it squares."""

    def __init__(self) -> None:
        self.square = False

    def allocate(self, size: Sequence[int], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: tdist.ProcessGroup,
                 op: Any, async_op: bool = False) -> Any:
        if self.square:
            if input_tensor.dtype not in _FLOAT_SUMS:
                raise RuntimeError(f"clsuite.sharding squares only {_FLOAT_SUMS} gradients, not {input_tensor.dtype}")
            input_tensor.square_()
            op = tdist.ReduceOp.SUM
        return tdist.reduce_scatter_single(output_tensor, input_tensor, op=op, group=group, async_op=async_op)


def is_sharded_model(model: torch.nn.Module) -> bool:
    """Whether FSDP has sharded ``model`` (its parameters are DTensors)."""
    return mesh_of(model) is not None


def hf_model(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model itself (inside a PEFT wrapper): the root FSDP shards, whose forward every call reaches."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The outermost modules of the classes the model names in ``_no_split_modules`` (its decoder layers)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    found: list[tuple[str, torch.nn.Module]] = []
    for name, m in model.named_modules():
        if type(m).__name__ in names and not any(name.startswith(f + ".") for f, _ in found):
            found.append((name, m))
    if not found:
        raise UserError(f"parallel=fsdp shards each decoder layer, and {type(model).__name__} names no layer class "
                        "(its _no_split_modules is empty or matches no module): use parallel=ddp")
    return [m for _, m in found]


def shard_model(ctx: Context) -> list[Strategy]:
    """Under ``parallel=fsdp``: the parametrization plugins' ``before_training`` (LoRA wraps the whole model), then
    ``fully_shard`` on each decoder layer and on the model; returns the plugins whose hook ran (none otherwise)."""
    if not sharded(ctx.config):
        return []
    check(ctx.config, ctx.plugins)
    early = [p for p in ctx.plugins if p.kind == "parametrization"]
    for p in early:
        p.before_training(ctx)
    dist.broadcast_model(ctx.model)  # every rank shards the same weights (an adapter's A is drawn at random)
    apply_fsdp(ctx.model)
    return early


def apply_fsdp(model: torch.nn.Module) -> None:
    """Shard ``model`` in place over every process: parameters, gradients and so optimizer state, in one group per
    decoder layer and one for the rest (embeddings, final norm, head), each resharded after its forward."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    root = hf_model(model)
    mesh = init_device_mesh(dist.device().type, (dist.world_size(),))
    comm = _Squaring()
    for m in [*decoder_layers(root), root]:
        # resharding the root too: between forward and backward (EWC's penalty) every parameter is its shard
        fully_shard(m, mesh=mesh, reshard_after_forward=True)
        m.set_custom_reduce_scatter(comm)
    root._clsuite_squaring = comm


def _squaring(model: torch.nn.Module) -> _Squaring:
    return hf_model(model)._clsuite_squaring


# --- norms and dot products over shards ---------------------------------------------------------------------------
def _sum_over_shards(t: torch.Tensor) -> None:
    """Sum a partial result (squares or products of this process's shards) over processes, in place."""
    dist.all_reduce_sum_([t])


def global_norm(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """‖concat(tensors)‖₂ over every shard of every tensor, accumulated in float32 (float64 kept): the squared local
    norms of sharded tensors summed over processes, whole tensors counted once. ``tensors`` may be a generator: each is
    reduced to its norm before the next is made. Without shards: the norm of the per-tensor norms, as in one process."""
    parts: list[torch.Tensor] = []
    whole: list[torch.Tensor] = []
    for t in tensors:
        n = torch.linalg.vector_norm(dist.local(t), dtype=at_least_float32(t.dtype))
        (parts if dist.is_sharded(t) else whole).append(n)
    if not parts:
        if not whole:
            return torch.zeros(())
        dev = whole[0].device
        return torch.linalg.vector_norm(torch.stack([n.to(dev) for n in whole]))
    dev = parts[0].device
    sq = torch.stack([n.to(dev) for n in parts]).square().sum()
    _sum_over_shards(sq)
    if whole:
        sq = sq + torch.stack([n.to(dev) for n in whole]).square().sum()
    return sq.sqrt()


def global_dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ_i ⟨a_i, b_i⟩ over every shard, accumulated in float32 at least (pairs of sharded tensors summed over
    processes)."""
    wide = at_least_float32(a[0].dtype)
    terms = [(dist.is_sharded(x), torch.sum(dist.local(x).to(wide) * dist.local(y).to(wide))) for x, y in zip(a, b)]
    whole = [t for s, t in terms if not s]
    parts = [t for s, t in terms if s]
    if not parts:
        return torch.stack(whole).sum()
    total = torch.stack(parts).sum()
    _sum_over_shards(total)
    return total + torch.stack(whole).sum().to(total.device) if whole else total


# --- EWC over shards ----------------------------------------------------------------------------------------------
def mean_squared_gradients(ctx: Context, rows: list[dict], objective: Callable[[dict], torch.Tensor],
                           what: str) -> dict[str, torch.Tensor]:
    """Mean over ``rows`` of the squared per-example gradient of ``objective(row)`` per trainable parameter, sharded
    like it (model in eval mode). Each process takes a strided share of ``rows``; at each round every process runs
    one example's backward pass and FSDP's reduce-scatter sums the *squared* gradients (``_Squaring``), so the result
    is a mean of squares; summing the gradients first would give the square of a mean. ``.grad`` is left as found."""
    model = ctx.model
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    kept = {n: p.grad for n, p in params.items()}
    mine = dist.shard(rows)
    rounds = -(-len(rows) // dist.world_size())
    comm = _squaring(model)
    was_training = model.training
    model.eval()  # no dropout noise in the per-example gradients
    for p in params.values():
        p.grad = None
    comm.square = True
    try:
        for i in range(rounds):
            out = objective(mine[i] if i < len(mine) else rows[0])  # a process out of rows adds 0 · a loss
            bad = torch.tensor(float(not torch.isfinite(out)))
            dist.all_reduce_sum_([bad])  # every process stops at the same round
            if bad:
                hf_model(model).reset_iter_state()  # a forward without its backward
                raise DivergenceError(f"non-finite {what} on task {getattr(ctx.task, 'name', '?')!r}")
            (out if i < len(mine) else out * 0).backward()
        sums = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in params.items()}
    finally:
        comm.square = False
        model.train(was_training)
        for n, p in params.items():
            p.grad = kept[n]
    ctx.example_passes += len(rows)
    return {n: s.detach().to(at_least_float32(s.dtype)).div_(max(1, len(rows))) for n, s in sums.items()}


def summed_over_processes(part: torch.Tensor) -> torch.Tensor:
    """A sum over elements of which this process computed its shards' ``part``: the value of the whole sum over
    processes, with the gradient of ``part`` alone (exactly this process's shard of the whole's gradient)."""
    total = part.detach().clone()
    dist.all_reduce_sum_([total])
    return part + (total - part.detach())


# --- shards in checkpoints ----------------------------------------------------------------------------------------
def mesh_of(model: torch.nn.Module) -> DeviceMesh | None:
    """The device mesh of the model's sharded parameters (None for a whole model)."""
    return next((p.device_mesh for p in model.parameters() if dist.is_sharded(p)), None)


def check_shard(t: torch.Tensor, owner: str) -> None:
    """A TypeError unless the DTensor ``t`` is sharded on dim 0 over a 1-D mesh, the only layout clsuite stores."""
    from torch.distributed.tensor import Shard
    if t.device_mesh.ndim != 1 or tuple(t.placements) != (Shard(0),):
        raise TypeError(f"{owner} holds a DTensor with placements {t.placements}: a checkpoint stores (Shard(0),) only")


def from_shard(local: torch.Tensor, shape: Sequence[int], mesh: DeviceMesh) -> DTensor:
    """The DTensor of global ``shape`` whose shard on this process is ``local`` (sharded on dim 0, as FSDP does)."""
    from torch.distributed.tensor import DTensor, Shard
    size = torch.Size(shape)
    stride = torch.empty(size, device="meta").stride()
    return DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=size, stride=stride)
