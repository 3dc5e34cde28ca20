"""Experience replay (rehearsal): a bounded buffer of past training examples mixed into every batch.

**Buffer.** ``size`` examples at most, filled after each experience with that experience's training rows
(``ctx.task.train``: the task's own rows, never the replayed ones):

* ``policy=reservoir``: Vitter's algorithm R over every training example seen so far, in stream order. After
  ``n`` examples have been offered, each of them is in the buffer with probability ``min(1, size / n)``,
  whichever task it came from, so older tasks keep a share proportional to their size.
* ``policy=balanced``: an equal share per task seen (``size // T`` each; the ``size % T`` spare slots go to the
  earliest tasks, so shares differ by at most one). Each task's share is a uniform sample of that task's rows;
  when a new task arrives the older shares are cut down by uniform sub-sampling, which keeps them uniform.

**Batch mixing.** At every optimizer step a fraction ``ratio`` of the batch is *replaced* by replayed examples:
the last ``k`` of the (already shuffled) current-task examples are dropped and ``k`` replayed ones appended, so
the batch size, and hence compute per step, stay those of plain fine-tuning (the record's compute multiplier
stays 1). ``k = ratio * batch_size``, rounded stochastically when it is not a whole number, so the expected
share is exactly ``ratio``. Of the ``k`` replayed examples a fraction ``general`` (again rounded
stochastically) comes from the stream's general data (``general_data:`` in the stream file, the paper's
rehearsal of general instruction data) and the rest from the buffer. While the buffer is empty (the first
experience) its part of the batch stays current-task data; the general part does not depend on the buffer and is
replayed from the first step, so ``replay(general=1)`` rehearses general data on a single-task stream too.
Replayed examples are drawn uniformly without replacement (with replacement only when the source is smaller
than the request). The closure fixes the mixed batch for all passes of the step (e.g. SAM's second pass).

**Randomness** comes from the plugin's own ``random.Random`` seeded from the run seed, so replay does not shift
the random draws of other plugins, and its state is part of ``state_dict()``. Under data parallelism every rank
therefore holds the same buffer and draws the same replayed examples: the buffer is filled from the task's
rows, and ``before_training_iteration`` sees the global batch (the engine shards it afterwards).

**Memory** (``extra_memory_bytes``): UTF-8 bytes of the strings held in the buffer (prompt, target and any
choices); Python object overhead is not counted, the general data belongs to the stream.
"""
from __future__ import annotations

import math
import random
from typing import Any, Literal

from pydantic import Field

from clsuite.errors import UserError
from clsuite.memory import RunShape, State
from clsuite.strategy import Params, Strategy, register


class ReplayParams(Params):
    size: int = Field(200, ge=0, description="buffer capacity in examples")
    policy: Literal["reservoir", "balanced"] = Field(
        "reservoir", description="reservoir: uniform over all examples seen; balanced: equal share per task")
    ratio: float = Field(0.25, ge=0, le=1, description="fraction of each batch replaced by replayed examples")
    general: float = Field(0.0, ge=0, le=1,
                           description="fraction of the replayed examples drawn from the stream's general data")


def _row(row: dict[str, Any]) -> dict[str, Any]:
    """A JSON-able copy of one training row."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in row.items()}


def _rows(dataset: Any, idx: list[int]) -> list[dict[str, Any]]:
    """Rows ``idx`` of a ``datasets.Dataset`` (fetched in one go) or of a list of dicts."""
    if not idx:
        return []
    if hasattr(dataset, "select"):
        return [_row(r) for r in dataset.select(idx).to_list()]
    return [_row(dataset[i]) for i in idx]


def _str_bytes(value: Any) -> int:
    if isinstance(value, str):
        return len(value.encode("utf-8"))
    if isinstance(value, (list, tuple)):
        return sum(_str_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_str_bytes(v) for v in value.values())
    return 0


def reservoir_add(buffer: list[dict[str, Any]], seen: int, name: str, rows: Any, size: int,
                  rng: random.Random) -> list[dict[str, Any]]:
    """Vitter's algorithm R: ``buffer`` (``size`` at most, ``seen`` examples offered before) after every row of
    task ``name`` is offered in order; entering rows are tagged ``"_task"``, and only they are fetched."""
    slots: list[Any] = list(buffer)
    for i in range(len(rows)):
        t = seen + i  # examples offered before this one
        if t < size:
            slots.append(i)
        else:
            j = rng.randint(0, t)
            if j < size:
                slots[j] = i
    new = [s for s in slots if isinstance(s, int)]
    fetched = dict(zip(new, _rows(rows, new)))
    return [s if isinstance(s, dict) else {**fetched[s], "_task": name} for s in slots]


def untagged(row: dict[str, Any]) -> dict[str, Any]:
    """A buffered row as a training example (its ``"_task"`` tag removed)."""
    return {k: v for k, v in row.items() if k != "_task"}


def buffer_bytes(buffer: list[dict[str, Any]]) -> int:
    """UTF-8 bytes of the strings a buffer holds (its tags not counted)."""
    return sum(_str_bytes(untagged(r)) for r in buffer)


def _stochastic_round(x: float, rng: random.Random) -> int:
    base = math.floor(x)
    return base + (1 if rng.random() < x - base else 0)


@register("replay")
class Replay(Strategy):
    kind = "data"
    description = "rehearsal: a buffer of past examples (and optionally general data) replaces part of each batch"
    Params = ReplayParams

    def __init__(self, params: ReplayParams | None = None):
        super().__init__(params)
        self.buffer: list[dict[str, Any]] = []  # rows, each with "_task": the task it came from
        self.seen = 0  # examples offered to the reservoir so far
        self.tasks: list[str] = []  # tasks added, in order
        self.rng = random.Random("replay-0")

    # --- buffer policies (usable without a Context; the tests drive them directly) --------------------
    def add_task(self, name: str, rows: Any) -> None:
        """Offer every row of one finished experience to the buffer."""
        n = len(rows)
        self.tasks.append(name)
        if self.params.policy == "reservoir":
            self._reservoir(name, rows, n)
        else:
            self._balanced(name, rows, n)

    def _reservoir(self, name: str, rows: Any, n: int) -> None:
        self.buffer = reservoir_add(self.buffer, self.seen, name, rows, self.params.size, self.rng)
        self.seen += n

    def _balanced(self, name: str, rows: Any, n: int) -> None:
        t, size = len(self.tasks), self.params.size
        quota = {task: size // t + (1 if i < size % t else 0) for i, task in enumerate(self.tasks)}
        by_task: dict[str, list[dict[str, Any]]] = {}
        for r in self.buffer:
            by_task.setdefault(r["_task"], []).append(r)
        kept = []
        for task in self.tasks[:-1]:
            have = by_task.get(task, [])
            kept += have if len(have) <= quota[task] else self.rng.sample(have, quota[task])
        idx = sorted(self.rng.sample(range(n), min(n, quota[name])))
        self.buffer = kept + [{**r, "_task": name} for r in _rows(rows, idx)]
        self.seen += n

    def counts(self) -> dict[str, int]:
        """Examples held per task."""
        out = {t: 0 for t in self.tasks}
        for r in self.buffer:
            out[r["_task"]] += 1
        return out

    def mix(self, examples: list[dict], general: Any = None) -> list[dict]:
        """Replace part of one batch with replayed examples (batch size unchanged)."""
        p = self.params
        k = min(len(examples), _stochastic_round(p.ratio * len(examples), self.rng))
        if k == 0:
            return examples
        n_general = _stochastic_round(p.general * k, self.rng) if general is not None else 0
        n_buffer = (k - n_general) if self.buffer else 0
        replayed = self._draw_general(general, n_general) + [
            untagged(r) for r in self._draw(self.buffer, n_buffer)]
        if not replayed:
            return examples
        return examples[:len(examples) - len(replayed)] + replayed

    def _draw(self, pool: list, n: int) -> list:
        if n <= 0 or not pool:
            return []
        if n <= len(pool):
            return self.rng.sample(pool, n)
        return [self.rng.choice(pool) for _ in range(n)]

    def _draw_general(self, general: Any, n: int) -> list[dict]:
        if n <= 0 or general is None or len(general) == 0:
            return []
        idx = self._draw(range(len(general)), n)
        fetched = dict(zip(sorted(set(idx)), _rows(general, sorted(set(idx)))))
        return [dict(fetched[i]) for i in idx]

    # --- hooks -------------------------------------------------------------------------------------
    def before_training(self, ctx) -> None:
        self.rng = random.Random(f"replay-{ctx.config.seed}")
        if self.params.general > 0 and (ctx.stream.general is None or len(ctx.stream.general) == 0):
            raise UserError(f"replay(general={self.params.general}) needs general data, but stream "
                            f"{ctx.stream.name!r} has none: add 'general_data: {{source: ...}}' to the stream "
                            "file or use replay(general=0)")

    def before_training_iteration(self, ctx, examples: list[dict]) -> list[dict]:
        general = ctx.stream.general if self.params.general > 0 else None
        return self.mix(examples, general)

    def after_training_exp(self, ctx) -> None:
        if ctx.task is not None and ctx.task.train is not None:
            self.add_task(ctx.task.name, ctx.task.train)

    # --- cost and state ----------------------------------------------------------------------------
    def memory_state(self, run: RunShape) -> list[State]:
        return [State("buffer of text rows (no tensors)", 0, where="host")]

    def extra_memory_bytes(self) -> int:
        return buffer_bytes(self.buffer)

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = self.rng.getstate()
        return {"buffer": [dict(r) for r in self.buffer], "seen": self.seen, "tasks": list(self.tasks),
                "rng": [version, list(internal), gauss]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer = [dict(r) for r in state["buffer"]]
        self.seen = int(state["seen"])
        self.tasks = list(state["tasks"])
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
