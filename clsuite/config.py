"""Validated run configuration: training budget, evaluation settings, and what a run is made of."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from .errors import UserError, pydantic_message
from .strategy import canonical_spec

if TYPE_CHECKING:
    from .streams import Stream


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class TrainConfig(_Strict):
    """How each experience is trained; a stream's ``train:`` block sets defaults, the CLI may override."""
    optimizer: str = Field("AdamW", description="any torch.optim class name")
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    steps: int | None = Field(None, ge=1, description="optimizer steps per experience (100 when epochs is unset)")
    epochs: float | None = Field(None, gt=0, description="instead of steps: ceil(epochs * train rows / batch_size) "
                                 "steps per experience, rows of the experience's own task")
    batch_size: int = Field(8, ge=1, description="examples per optimizer step (split over grad_accum)")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    max_grad_norm: float | None = Field(1.0, gt=0)
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    max_length: int = Field(128, ge=8)
    precision: Literal["fp32", "bf16", "bf16-weights"] = Field(
        "fp32", description="bf16: forward passes of training under torch.autocast(bfloat16); weights stay fp32. "
        "bf16-weights: weights and gradients in bfloat16, an fp32 master copy stepped by the optimizer "
        "(docs/memory.md)")
    # The same gradients either way (tests/test_memory.py), so, like parallel, left out of the dumped config and the
    # fingerprint; each experience's log says whether it was on (docs/memory.md).
    activation_checkpointing: bool = Field(
        False, exclude=True, description="recompute each decoder layer's activations in the backward pass instead of "
        "keeping them (transformers' gradient checkpointing)")
    # How the processes split the work, like their number: the same numbers either way (up to the order of float
    # sums), so it is left out of the dumped config and so of the fingerprint (docs/distributed.md).
    parallel: Literal["ddp", "fsdp"] = Field(
        "ddp", exclude=True, description="under torchrun: ddp replicates the model on every process; fsdp shards "
        "parameters, gradients and optimizer state over them (torch's fully_shard, per decoder layer)")

    @pydantic.model_validator(mode="after")
    def _divisible(self) -> "TrainConfig":
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of grad_accum {self.grad_accum}")
        return self

    @pydantic.model_validator(mode="after")
    def _budget(self) -> "TrainConfig":
        if self.steps is not None and self.epochs is not None:
            raise ValueError(f"steps ({self.steps}) and epochs ({self.epochs}) are both set: set the other to null, "
                             "--set steps=null to train by epochs or --set epochs=null to train by steps")
        if self.steps is None and self.epochs is None:
            self.steps = 100
        return self

    def steps_for(self, rows: int) -> int:
        """Optimizer steps of an experience with ``rows`` training rows: ``steps``, or ceil(epochs * rows / batch)."""
        if self.epochs is None:
            return self.steps
        return max(1, math.ceil(self.epochs * rows / self.batch_size))


class EvalConfig(_Strict):
    split: Literal["test", "val"] = Field("test", description="what is scored: the test part (leaderboards) or the "
                                          "validation part (tuning; probes without one are left out)")
    batch_size: int = Field(32, ge=1)
    max_length: int = Field(128, ge=8)
    max_examples: int | None = Field(None, ge=1, description="cap on eval examples per task")
    sharpness: Literal["off", "worst", "cheap", "full"] = Field(
        "off", description="sharpness scalars after each experience (clsuite.sharpness.measure_sharpness): worst: "
        "worst-case only; cheap: and the Hessian trace; full: and the top eigenvalue and surface metrics")
    sharpness_examples: int = Field(32, ge=1, description="first train rows of the experience's task measured")


class RunConfig(_Strict):
    """Everything that determines a run's numbers (with the code version and hardware, recorded beside it)."""
    stream: str
    strategy: str = "naive"
    seed: int = 0
    model: str | None = None
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()


def validated(cls: type[BaseModel], data: dict, where: str) -> BaseModel:
    """Build ``cls`` from ``data`` or raise a one-line UserError naming each bad field (and a misspelt key's fix)."""
    try:
        return cls.model_validate(data)  # not cls(**data): keys need not be strings
    except pydantic.ValidationError as e:
        raise UserError(f"{where}: {pydantic_message(e, cls)}") from None


def resolve_config(stream: Stream, strategy: str, seed: int, model: str | None = None,
                   train: dict[str, Any] | None = None, eval: dict[str, Any] | None = None) -> RunConfig:
    """The stream's defaults overlaid with the caller's settings, validated."""
    tc = validated(TrainConfig, {**stream.train, **(train or {})}, f"training settings of stream {stream.name}")
    ec = validated(EvalConfig, {**stream.eval, **(eval or {})}, f"evaluation settings of stream {stream.name}")
    return RunConfig(stream=stream.name, strategy=canonical_spec(strategy), seed=seed,
                     model=model or stream.model, train=tc, eval=ec)
