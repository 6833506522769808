"""Shared fixtures: tiny checkpoints built on the fly (no network, a few KB each)."""

from __future__ import annotations

import os

import pytest
import torch

from merge_lab.testing import make_checkpoint

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(2)


@pytest.fixture(scope="module")
def one_thread():
    """Toy models are tiny: a second intra-op thread only adds contention (3x slower under load).
    A module asks for it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def family(tmp_path_factory):
    """A bf16 llama base and three fine-tunes of it, each saved in several shards."""
    root = tmp_path_factory.mktemp("family")
    base = make_checkpoint(root / "base", "llama", seed=0, dtype=torch.bfloat16)
    models = [make_checkpoint(root / f"m{i}", "llama", seed=i, dtype=torch.bfloat16, base=base) for i in (1, 2, 3)]
    return base, models


@pytest.fixture(scope="session")
def fp32_family(tmp_path_factory):
    """A float32 llama base with 3 layers and three fine-tunes of it (the parity tests' inputs)."""
    root = tmp_path_factory.mktemp("parity")
    base = make_checkpoint(root / "base", "llama", seed=0, dtype=torch.float32, layers=3)
    models = [make_checkpoint(root / f"m{i}", "llama", seed=i, dtype=torch.float32, base=base, layers=3) for i in (1, 2, 3)]
    return base, models
