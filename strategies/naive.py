"""Plain fine-tuning: no plugin changes the engine's default loop."""
from clsuite.memory import RunShape, State
from clsuite.strategy import Strategy, register


@register("naive", aliases=("finetune",))
class Naive(Strategy):
    kind = "base"
    description = "plain fine-tuning on each task in turn (the forgetting baseline)"

    def memory_state(self, run: RunShape) -> list[State]:
        return []
