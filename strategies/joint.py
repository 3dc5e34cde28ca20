"""Joint training, the reference upper bound of continual learning: every batch is drawn from all tasks at once."""
from __future__ import annotations

import random
from typing import Any

from clsuite.memory import RunShape, State
from clsuite.strategy import Strategy, register


@register("joint")
class Joint(Strategy):
    kind = "data"
    description = ("reference upper bound: each batch drawn uniformly from the training rows of every task of the "
                   "stream, so task order plays no part (the same number of steps as the others)")

    def __init__(self, params: Any = None):
        super().__init__(params)
        self.rng = random.Random("joint-0")

    def before_training(self, ctx) -> None:
        self.rng = random.Random(f"joint-{ctx.config.seed}")
        self.sizes = [len(t.train) for t in ctx.stream.tasks]

    def before_training_iteration(self, ctx, examples: list[dict]) -> list[dict]:
        picks = [self.rng.randrange(sum(self.sizes)) for _ in examples]
        out = []
        for i in picks:
            for task, n in zip(ctx.stream.tasks, self.sizes):
                if i < n:
                    out.append(dict(task.train[i]))
                    break
                i -= n
        return out

    def memory_state(self, run: RunShape) -> list[State]:
        return []  # draws text rows of the stream's tasks

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = self.rng.getstate()
        return {"rng": [version, list(internal), gauss]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
