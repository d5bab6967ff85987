"""Fixtures shared by the test modules."""
from __future__ import annotations

import os

import pytest
import torch

# In-process CLI calls would otherwise set torch's thread count to the machine's cores for the rest of the session
# (diffcore.runtime.default_threads); tiny test models run fastest on one thread and CI's 2 cores are shared.
os.environ.setdefault("DIFFCORE_THREADS", "1")
# What the tests compute must not depend on the CPU they run on: precision="auto" (diffcore.sample's default) picks
# bf16 on CPUs with AMX or AMD AVX512-BF16. The tests see a CPU without them (auto = fp32) unless a test sets
# DIFFCORE_CPU_FEATURES itself (monkeypatch) to exercise the bf16 choice.
os.environ.setdefault("DIFFCORE_CPU_FEATURES", "avx512,avx2")


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread (and CI's 2 cores are shared); restores the setting afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny learned-variance checkpoint of 8x8 one-channel images and 10 timesteps (``helpers.tiny_checkpoint``),
    one per test module; modules that need another size define their own ``ckpt``."""
    from helpers import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", 8, num_timesteps=10)
