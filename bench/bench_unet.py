"""U-Net speed on CPU, single-threaded, at the presets' default sizes (pytest-benchmark).

Run: ``python -m pytest bench/bench_unet.py --benchmark-disable-gc`` (medians are the numbers to compare).
Forward passes: fashion_mnist_small at batch 64, cifar10 at batch 8; plus one fashion_mnist_small training
step (forward, backward, Adam) at batch 64, the unit of the CPU training budget.
"""
from __future__ import annotations

import pytest
import torch

from diffcore.unet import UNet, UNetConfig

FORWARD_CASES = {"fashion_mnist_small-b64": (UNetConfig.fashion_mnist_small, 64), "cifar10-b8": (UNetConfig.cifar10, 8)}


@pytest.fixture(autouse=True)
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _setup(make_config, batch: int):
    config = make_config()
    torch.manual_seed(0)
    model = UNet(config)
    x = torch.randn(batch, config.in_channels, config.image_size, config.image_size)
    t = torch.randint(0, 1000, (batch,))
    return model, x, t


@pytest.mark.parametrize("case", list(FORWARD_CASES))
def test_unet_forward(benchmark, case):
    model, x, t = _setup(*FORWARD_CASES[case])
    model.eval()
    benchmark.extra_info.update(params=sum(p.numel() for p in model.parameters()), batch=x.shape[0], threads=1)

    def forward():
        with torch.inference_mode():
            return model(x, t)

    out = benchmark.pedantic(forward, rounds=5, warmup_rounds=1, iterations=1)
    assert out.shape == (x.shape[0], model.config.out_channels, *x.shape[2:])


def test_unet_train_step_fashion_mnist_small(benchmark):
    model, x, t = _setup(UNetConfig.fashion_mnist_small, 64)
    model.train()
    target = torch.randn(x.shape[0], model.config.out_channels, *x.shape[2:])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    benchmark.extra_info.update(batch=x.shape[0], threads=1)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = (model(x, t) - target).square().mean()
        loss.backward()
        optimizer.step()
        return loss.detach()

    assert torch.isfinite(benchmark.pedantic(step, rounds=5, warmup_rounds=1, iterations=1))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("library", ["diffcore", "diffusers"])
def test_unet_forward_vs_diffusers(benchmark, library, precision):
    """The packaged Fashion-MNIST config (1,743,170 parameters) at batch 64 against diffusers' UNet2DModel of the
    same size (DESIGN.md section 5); compare the medians of the same precision."""
    if library == "diffusers":
        pytest.importorskip("diffusers")
        from bench_end_to_end import diffusers_unet

        model = diffusers_unet()
        call = lambda: model(x, t).sample  # noqa: E731
    else:
        from diffcore.pretrained import load_default

        model = load_default().model.eval()
        call = lambda: model(x, t)  # noqa: E731
    torch.manual_seed(0)
    x = torch.randn(64, 1, 28, 28)
    t = torch.randint(0, 1000, (64,))
    benchmark.extra_info.update(library=library, precision=precision, batch=64, threads=1)

    def forward():
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
            return call()

    assert benchmark.pedantic(forward, rounds=5, warmup_rounds=1, iterations=1).shape == (64, 2, 28, 28)
