"""diffcore.runtime (CPU features, precision, threads, compile buckets) and the speed options of diffcore.sample."""
from __future__ import annotations

import os

import pytest
import torch

import diffcore
from diffcore import runtime
from diffcore.diffusion import GaussianDiffusion
from diffcore.metrics.classifier import extract_features, load_feature_extractor
from diffcore.pretrained import load_default
from diffcore.schedules import make_schedule
from diffcore.unet import UNet, UNetConfig


@pytest.fixture
def cpu(monkeypatch):
    """Simulate a CPU: ``cpu("avx512,avx512_bf16")``."""
    def simulate(features: str) -> None:
        monkeypatch.setenv(runtime.FEATURES_ENV, features)
    return simulate


def small_model(seed: int = 0, **overrides) -> UNet:
    base = dict(in_channels=1, model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
                image_size=8, learn_sigma=False, num_heads=2, norm_groups=8)
    base.update(overrides)
    torch.manual_seed(seed)
    model = UNet(UNetConfig(**base))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


# ----------------------------------------------------------------------------------------- CPU features
def test_cpu_features_from_env_and_cpuinfo(cpu):
    cpu("avx2")
    f = runtime.cpu_features()
    assert (f.amx, f.avx512_bf16, f.avx512, f.avx2, f.source) == (False, False, False, True, "env")
    cpu("none")
    assert not any((runtime.cpu_features().avx2, runtime.cpu_features().amx))
    cpu("avx512,sse9")
    with pytest.raises(ValueError, match="DIFFCORE_CPU_FEATURES.*sse9"):
        runtime.cpu_features()


def test_cpu_features_match_proc_cpuinfo(monkeypatch):
    monkeypatch.delenv(runtime.FEATURES_ENV, raising=False)
    if not os.path.exists("/proc/cpuinfo"):
        pytest.skip("no /proc/cpuinfo")
    flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split(":")[1].split()
    f = runtime.cpu_features()
    assert f.source == "cpuinfo"
    assert (f.avx2, f.avx512, f.avx512_bf16, f.amx) == ("avx2" in flags, "avx512f" in flags, "avx512_bf16" in flags,
                                                         "amx_bf16" in flags)


@pytest.mark.parametrize("features, expected", [
    ("amx,avx512_bf16,avx512,avx2", torch.bfloat16),       # Intel with AMX
    ("avx512_bf16,avx512,avx2,amd", torch.bfloat16),       # AMD Zen 4: bf16 measured 1.5-1.66x of fp32
    ("avx512_bf16,avx512,avx2", torch.float32),            # Intel without AMX: bf16 0.88x
    ("avx512,avx2", torch.float32),
    ("avx2", torch.float32),
    ("avx2,amd", torch.float32),
])
def test_auto_precision_on_cpus(cpu, features, expected):
    cpu(features)
    assert runtime.resolve_precision("auto", "cpu") == expected
    assert runtime.resolve_precision("fp32", "cpu") == torch.float32


def test_precision_errors_and_warnings(cpu):
    cpu("avx2")
    with pytest.raises(ValueError, match="precision: expected one of fp32, bf16, fp16, auto, got 'half'"):
        runtime.resolve_precision("half", "cpu")
    with pytest.raises(ValueError, match="precision: 'fp16' runs on GPUs only"):
        runtime.resolve_precision("fp16", "cpu")
    with pytest.warns(RuntimeWarning, match="bf16.*slower|0.06-0.9x"):
        assert runtime.resolve_precision("bf16", "cpu") == torch.bfloat16
    cpu("amx")
    assert runtime.resolve_precision("bf16", "cpu") == torch.bfloat16


def test_training_bf16_follows_the_cpu(cpu):
    cpu("avx2")
    with pytest.warns(RuntimeWarning, match="bf16: training in float32"):
        assert runtime.training_bf16(True, "cpu") is False
    assert runtime.training_bf16(False, "cpu") is False
    cpu("amx")
    assert runtime.training_bf16(True, "cpu") is True


# ------------------------------------------------------------------------------------------------- threads
def test_thread_policy():
    available = len(os.sched_getaffinity(0))
    assert 1 <= runtime.default_threads() <= available
    before = torch.get_num_threads()
    try:
        assert runtime.set_threads(1) == 1 and torch.get_num_threads() == 1
        assert runtime.set_threads() == runtime.default_threads() == torch.get_num_threads()
        with pytest.raises(ValueError, match=f"threads: expected 1..{available}"):
            runtime.set_threads(0)
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------------ batches and buckets
def test_batch_slices_and_buckets():
    assert runtime.batch_slices(5, 2) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert runtime.batch_slices(3, 8) == [slice(0, 3)]
    with pytest.raises(ValueError, match="batch_size: expected an int >= 1"):
        runtime.batch_slices(3, 0)
    assert [runtime.bucket_for(n, (1, 4, 16)) for n in (1, 2, 4, 5, 16, 17)] == [1, 4, 4, 16, 16, 17]
    assert runtime.default_batch_size(500, "cpu") == runtime.CPU_BATCH_SIZE
    assert runtime.default_batch_size(3, "cpu") == 3


@pytest.mark.slow  # multi-second end-to-end test: CI runs it with -m slow
def test_bucketed_model_pads_without_changing_any_output(one_thread, tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    model = small_model(1, num_classes=3)
    calls = []

    class Spy(torch.nn.Module):  # records the batch sizes the wrapped function sees
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, t, y=None):
            calls.append(x.shape[0])
            return self.inner(x, t, y)

    wrapped = runtime.compile_model(Spy(model), backend="eager", buckets=(4, 8), cache=tmp_path / "cache")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache") and (tmp_path / "cache").is_dir()
    torch.manual_seed(0)
    x = torch.randn(5, 1, 8, 8)
    t = torch.randint(0, 1000, (5,))
    y = torch.tensor([0, 1, 2, 3, 1])
    with torch.no_grad():
        got = wrapped(x, t, y=y)
        singles = torch.cat([model(x[i:i + 1], t[i:i + 1], y[i:i + 1]) for i in range(5)])
    assert calls == [8] and got.shape == (5, 1, 8, 8)
    assert singles.std() > 0.1 and (got - singles).abs().max() <= 1e-5 * singles.abs().max()


# ------------------------------------------------------------------------------------- diffcore.sample options
def tiny_diffusion() -> GaussianDiffusion:
    return GaussianDiffusion(make_schedule("cosine", 100))


@pytest.mark.parametrize("batch_size", [1, 2, 3, 7])
def test_sample_gives_the_same_images_for_every_batch_size(one_thread, batch_size):
    model = small_model(2)
    kw = dict(n=7, steps=5, seed=5, diffusion=tiny_diffusion(), progress=False, precision="fp32")
    whole = diffcore.sample(model, **kw, batch_size=7)
    split = diffcore.sample(model, **kw, batch_size=batch_size)
    assert whole.dtype == torch.float32 and whole.std() > 0.1
    assert (split - whole).abs().max() <= 1e-5


def test_sample_batch_size_errors(one_thread):
    model = small_model(2)
    kw = dict(n=4, steps=3, seed=0, diffusion=tiny_diffusion(), progress=False)
    with pytest.raises(ValueError, match="batch_size: expected an int >= 1"):
        diffcore.sample(model, batch_size=0, **kw)
    with pytest.raises(ValueError, match="precision: expected one of"):
        diffcore.sample(model, precision="int8", **kw)
    assert diffcore.sample(model, eta=1.0, batch_size=3, **kw).shape == (4, 1, 8, 8)  # stochastic splits too


def test_sample_defaults_to_auto_precision(one_thread, cpu):
    """diffcore.sample's default precision is "auto": bf16 autocast on a CPU where bf16 is fast (the model then
    sees bfloat16 activations), exactly the fp32 images elsewhere; restore and evaluate default to fp32."""
    import inspect

    from diffcore.pipelines import evaluate, restore

    seen = []
    model = small_model(4)

    def recording(x, t, **kw):  # the dtype a matmul runs in, here, inside the sampler's model call
        seen.append((x[:, :1, :1, 0] @ x[:, :1, :1, 0].transpose(-1, -2)).dtype)
        return model(x, t, **kw)

    kw = dict(n=3, steps=3, seed=1, diffusion=tiny_diffusion(), progress=False, image_shape=(1, 8, 8))
    cpu("amd,avx512_bf16,avx512,avx2")
    fast = diffcore.sample(recording, **kw)
    assert set(seen) == {torch.bfloat16}
    seen.clear()
    cpu("avx512,avx2")
    plain = diffcore.sample(recording, **kw)
    assert set(seen) == {torch.float32}
    assert torch.equal(plain, diffcore.sample(model, precision="fp32", **kw))
    # bf16 changes the images a little; a few pixels may fork (x0 is amplified ~1/sqrt(alpha_bar) at the first step
    # and then clipped), as measured on the packaged model (bench/RESULTS.md), so bound the mean and the share
    difference = (fast - plain).abs()
    assert 0 < difference.mean() < 0.05 and (difference > 0.1).float().mean() < 0.05
    assert runtime.SAMPLE_PRECISION == "auto" and runtime.DEFAULT_PRECISION == "fp32"
    assert inspect.signature(restore.restore).parameters["precision"].default == "fp32"
    assert inspect.signature(evaluate.evaluate_model).parameters["precision"].default == "fp32"


@pytest.mark.slow
def test_bf16_samples_close_to_fp32_in_feature_statistics(one_thread, cpu):
    """The packaged model's bf16 samples against fp32 ones at equal seeds, in the classifier's features: the
    shift of the feature means is small against the features' spread (pixels may differ where trajectories fork)."""
    cpu("amx")  # let bf16 run (as on a CPU where it is fast); the numbers are the same on any x86 CPU
    packaged = load_default()
    kw = dict(n=24, steps=10, seed=3, diffusion=packaged.diffusion, progress=False, image_shape=packaged.image_shape)
    fp32 = diffcore.sample(packaged.model, precision="fp32", **kw)
    bf16 = diffcore.sample(packaged.model, precision="auto", **kw)
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16).all() and bf16.abs().max() <= 1
    assert 0 < (bf16 - fp32).abs().mean() < 0.05  # bf16 really ran and images stay close
    extractor = load_feature_extractor()
    f32, f16 = (extract_features(s, extractor) for s in (fp32, bf16))
    f32, f16 = (torch.as_tensor(f).double() for f in (f32, f16))
    spread = f32.std(0).mean()
    assert (f16.mean(0) - f32.mean(0)).norm() / f32.shape[1] ** 0.5 < 0.1 * spread
    assert abs(f16.std(0).mean() - spread) < 0.1 * spread
