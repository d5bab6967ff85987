"""Training throughput of the default (fashion_mnist_small) U-Net on CPU: fused hybrid loss against the reference.

One optimizer step at batch 32 on the built-in synthetic 28x28 set, single-threaded; images/s = 32 / median.
The loss ops are a small share of a CPU training step (the U-Net's forward and backward dominate), so the two
paths are expected to be close; the ratio printed at the end says by how much the fused loss helps.
"""
from __future__ import annotations

import pytest

from diffcore import ops
from diffcore.train import TrainConfig, Trainer
from diffcore.unet import UNetConfig

BATCH = 32

pytestmark = pytest.mark.skipif(not ops.fused_available("cpu"), reason="diffcore._C is not built")


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_train_step_throughput(benchmark, tmp_path, impl):
    config = TrainConfig(data="synthetic", image_size=28, model=UNetConfig.fashion_mnist_small(dropout=0.0), schedule="cosine",
                         variance_type="learned_range", loss_type="rescaled_mse", batch_size=BATCH,
                         total_steps=1000, out_dir=str(tmp_path), progress=False)
    trainer = Trainer(config, device="cpu", resume=False, impl=impl)
    trainer.train_step()  # warm-up
    benchmark.group = "train step fashion_mnist_small b32"
    benchmark.extra_info["impl"] = impl
    benchmark.pedantic(trainer.train_step, rounds=5, iterations=1)
    benchmark.extra_info["images_per_s"] = BATCH / benchmark.stats.stats.median
