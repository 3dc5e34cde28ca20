"""Numeric conventions shared by measurements, update rules and collectives."""
from __future__ import annotations

import torch


def at_least_float32(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums and norms are taken in: float32 for half precision, wider dtypes kept (no float64 upcast,
    which some devices lack)."""
    return torch.promote_types(dtype, torch.float32)
