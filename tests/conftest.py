"""Shared fixtures: a private model cache per test session (the tiny base model is built once), the tiny test stream."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

TINY_STREAM = str(Path(__file__).parent / "data" / "tiny-test.yaml")

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_stream_path() -> str:
    return TINY_STREAM


@pytest.fixture(scope="session")
def tiny_stream():
    from clsuite.streams import load_stream
    return load_stream(TINY_STREAM)
