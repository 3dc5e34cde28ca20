"""``clsuite plan``: the estimated memory per process of a run (``clsuite.memory.plan_memory``), as a table, and whether
it fits a device."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .config import TrainConfig, validated
from .errors import UserError
from .memory import Plan, model_shape, plan_memory
from .strategy import build_strategy

GIB = 2 ** 30


@dataclass(frozen=True)
class StreamSettings:
    """What the plan reads of a stream file, without building its data."""
    name: str
    model: str
    train: dict[str, Any]
    tasks: int
    general: bool


def stream_settings(ref: str) -> StreamSettings:
    """A stream's model, training block, task count and whether it has general data, read from its YAML alone."""
    from .stream_schema import StreamSpec
    from .streams import _read_yaml, _validated, resolve_stream_file
    path = resolve_stream_file(ref)
    doc = _read_yaml(path)
    spec = _validated(StreamSpec, doc, f"stream {path.name}", "stream file")
    return StreamSettings(spec.name or path.stem, spec.model, doc.get("train") or {}, len(spec.tasks or []),
                          spec.general_data is not None)


def make_plans(specs: list[str], model: str | None, stream: str | None, processes: int, parallel: str,
               overrides: dict[str, Any], device: str = "cuda") -> list[Plan]:
    """One plan per strategy spec, at the stream's training settings (TrainConfig's defaults without a stream)
    overlaid with ``overrides``."""
    if stream is None and model is None:
        raise UserError("give --model (a registered model, local directory or known config) or --stream")
    for spec in specs:  # before a model is built
        build_strategy(spec)
    s = stream_settings(stream) if stream is not None else None
    where = f"training settings of stream {s.name}" if s else "training settings"
    train = validated(TrainConfig, {**(s.train if s else {}), **overrides}, where)
    shape = model_shape(model or s.model)
    return [plan_memory(shape, train, spec, processes, parallel, tasks=s.tasks if s else 1,
                        general=s.general if s else False, device=device) for spec in specs]


def size(n: int | None) -> str:
    """Bytes in GiB, MiB or KiB, whichever keeps the number above 1 (0 as 0)."""
    if n is None:
        return "unknown"
    for unit, scale in (("GiB", GIB), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B" if n else "0"


def render(plan: Plan, device_gb: float | None = None) -> str:
    """The plan as a table of components at the two moments, its peak, and the fit on ``device_gb`` GiB."""
    from tabulate import tabulate
    t, m = plan.train, plan.model
    head = (f"{plan.strategy} on {m.name} ({m.source}, {m.parameters / 1e6:,.1f}M parameters): {plan.processes} "
            f"process{'es' * (plan.processes > 1)}, {plan.parallel}; micro-batch {plan.micro_batch} × "
            f"{plan.tokens} tokens, precision {t.precision}, activation checkpointing "
            f"{'on' if t.activation_checkpointing else 'off'}")
    names = {"pass": "backward start", "end": "backward end", "step": "optimizer step"}
    rows = [[x.component, *(size(x.at(m)) for m in plan.moments), x.where, x.note] for x in plan.lines]
    table = tabulate(rows, headers=["per process", *(names[m] for m in plan.moments), "where", "note"])
    dev = ("device",)
    out = [head, table, f"peak per process on the device: {size(plan.peak(dev))} (at the "
                        f"{names[plan.peak_moment(dev)]})"]
    host = plan.peak(("host",))
    if host:
        out[-1] += f"; in host memory: {size(host)}"
    unknown = plan.unknown()
    if unknown:
        out.append(f"incomplete: {len(unknown)} component{'s' * (len(unknown) > 1)} unknown "
                   f"({', '.join(x.component for x in unknown)}); the peak counts the known ones only")
    if device_gb is not None:
        out.append(fit_line(plan, device_gb))
    return "\n".join(out)


def fit_line(plan: Plan, device_gb: float) -> str:
    """Whether the peak fits ``device_gb`` GiB; the CUDA context and the allocator's fragmentation are not counted."""
    if device_gb <= 0:
        raise UserError(f"--device-gb {device_gb}: give the device's memory in GiB, e.g. 80")
    peak, room = plan.peak(("device",)), device_gb * GIB
    caveat = "; not counted: the CUDA context (about 0.5 GiB) and the allocator's fragmentation"
    if plan.unknown():
        verdict = "unknown (some components are unknown)" if peak <= room else "no, even without the unknown ones"
        return f"fits {device_gb:g} GiB: {verdict}{caveat}"
    if peak <= room:
        return f"fits {device_gb:g} GiB: yes, {size(int(room - peak))} to spare{caveat}"
    return f"fits {device_gb:g} GiB: no, {size(int(peak - room))} short{caveat}"
