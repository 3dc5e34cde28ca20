"""clsuite's SAM and ASAM for Avalanche strategies: ``SAMPlugin`` (docs/avalanche.md)."""
from __future__ import annotations

from typing import Any, Callable

import torch
from avalanche.core import SupervisedPlugin
from pydantic import ValidationError

from clsuite.errors import UserError, pydantic_message
from clsuite.strategies.sam import ASAMParams, SAMParams, SharpnessAware


class SAMPlugin(SupervisedPlugin):
    """SAM (ASAM when ``adaptive``) beside any Avalanche strategy and its plugins. It wraps the strategy's
    ``backward``: the one point after every penalty (``before_backward``) and before every gradient edit
    (``after_backward``, ``before_update``) and the optimizer step, so both passes see the full objective."""

    def __init__(self, rho: float | None = None, adaptive: bool = False, eta: float = 0.01):
        """``rho``: the radius (default 0.05 for SAM, 0.5 for ASAM); ``eta``: ASAM's offset in ``T = |w| + eta``."""
        super().__init__()
        cls = ASAMParams if adaptive else SAMParams
        try:
            params = cls(eta=eta, **({} if rho is None else {"rho": rho}))
        except ValidationError as e:
            raise UserError(f"SAMPlugin: {pydantic_message(e, cls)}") from None
        self.sam = SharpnessAware(params)  # clsuite's SAM math: global norm, e, the pass at w + e, restore by copy
        self._own: Callable[[], None] | None = None
        self._kwargs: dict[str, Any] = {}

    @property
    def rho(self) -> float:
        return self.sam.params.rho

    def before_training(self, strategy: Any, **kwargs: Any) -> None:
        """Wrap ``strategy.backward`` (once: a ``train`` that raised may have left the wrapper in place)."""
        if getattr(vars(strategy).get("backward"), "sam_plugin", None) is self:
            return
        self._own = vars(strategy).get("backward")  # an instance attribute to put back, or None
        inner = strategy.backward

        def backward() -> None:
            self._sam_backward(strategy, inner)

        backward.sam_plugin = self  # type: ignore[attr-defined]
        strategy.backward = backward

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        """Keep pass 1's callback arguments for pass 2's ``before_backward``."""
        self._kwargs = kwargs

    def after_training(self, strategy: Any, **kwargs: Any) -> None:
        """Put the strategy's own ``backward`` back."""
        if getattr(vars(strategy).get("backward"), "sam_plugin", None) is not self:
            return
        if self._own is None:
            del strategy.backward
        else:
            strategy.backward = self._own

    def _sam_backward(self, strategy: Any, inner: Callable[[], None]) -> None:
        """Pass 1 (``inner``: the strategy's backward of its full loss) leaves ``g`` in ``.grad``; pass 2 re-runs
        forward, criterion and every ``before_backward`` at ``w + e`` and leaves ``g_sam`` there; ``w`` is restored by
        copy, and ``loss``/``mb_output`` are pass 1's (the objective at ``w``, as a plain step logs it)."""
        inner()
        params = [p for p in strategy.model.parameters() if p.grad is not None]
        loss, output = strategy.loss, strategy.mb_output
        with torch.no_grad():
            factor = self.sam._factor(params, self.rho)
        if factor is None:
            raise FloatingPointError(f"SAM: the gradient norm is not finite at training iteration "
                                     f"{strategy.clock.train_iterations}: lower the learning rate")

        def second_pass() -> torch.Tensor:
            for p in params:
                p.grad = None
            strategy.loss = strategy._make_empty_loss()
            strategy.mb_output = strategy.forward()
            strategy.loss += strategy.criterion()
            strategy._before_backward(**self._kwargs)  # every plugin's penalty, now at w + e
            inner()
            return strategy.loss

        self.sam.pass_at(second_pass, params, lambda p: self.sam._e(p, factor))
        strategy.loss, strategy.mb_output = loss, output
