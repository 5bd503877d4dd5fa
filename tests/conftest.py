"""Shared fixtures: the shipped tiny-sd pipeline, loaded once per test session (offline)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def tiny_pipe():
    """The built-in random-weight SD-geometry pipeline (fixtures/tiny-sd)."""
    import torch

    from evalkit.models import load

    torch.manual_seed(0)
    return load("tiny-sd")
