"""The CPU kernel variants (one per instruction set, chosen at run time) against each other and the reference.

Each variant is forced by DIFFCORE_CPU_ISA in a subprocess (the choice is made once per process); every op runs
on the same seeded inputs there and the outputs come back through a file. The variants must agree with the
pure-torch reference within the usual tolerances and report themselves in build_info().
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import diffcore
from diffcore import ops

pytestmark = pytest.mark.skipif(not ops.fused_available("cpu"), reason="diffcore._C is not built")

ROOT = Path(__file__).resolve().parents[1]

# Runs every fused op (and the hybrid loss backward) on seeded inputs and saves the outputs to sys.argv[1].
SCRIPT = textwrap.dedent('''
    import sys
    import torch
    import diffcore
    from diffcore import ops
    sys.path.insert(0, sys.argv[2])
    from op_cases import make_table, timesteps

    def outputs(impl):
        g = torch.Generator().manual_seed(0)
        table, t = make_table(), timesteps(6)
        x = torch.randn(6, 3, 9, 7, generator=g)
        eps = torch.randn(6, 3, 9, 7, generator=g)
        mo = torch.randn(6, 6, 9, 7, generator=g).clamp(-1, 1)
        noise = torch.randn(6, 3, 9, 7, generator=g)
        x0 = x.clamp(-1, 1)
        out = {"q_sample": ops.q_sample(x0, noise, t, table, impl=impl)}
        for dtype in [torch.float32, torch.float64, torch.bfloat16]:
            out[f"ddim {dtype}"] = ops.ddim_step(x.to(dtype), eps.to(dtype), t, t - 5, table, 0.5,
                                                 clip_denoised=True, seed=3, impl=impl)
            out[f"ddpm {dtype}"] = ops.ddpm_step(x.to(dtype), mo.to(dtype), t, table,
                                                 variance_type="learned_range", seed=4, impl=impl)
        leaf = mo.clone().requires_grad_(True)
        mse, vb = ops.hybrid_loss(leaf, x0, ops.q_sample(x0, noise, t, table, impl="reference"), noise, t, table,
                                  impl=impl)
        (mse.sum() + vb.sum()).backward()
        out["hybrid"] = (mse.detach(), vb.detach(), leaf.grad)
        return out

    torch.save({"isa": diffcore.build_info()["cpu_isa"], "fused": outputs("fused"),
                "reference": outputs("reference")}, sys.argv[1])
''')


def _run_variant(isa: str, tmp_path: Path) -> dict:
    out = tmp_path / f"{isa}.pt"
    env = dict(os.environ, DIFFCORE_CPU_ISA=isa, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, "-c", SCRIPT, str(out), str(ROOT / "tests")], env=env, check=True, cwd=ROOT,
                   timeout=120)
    return torch.load(out)


def _flatten(value):
    return list(value) if isinstance(value, tuple) else [value]


def _close(a, b):
    atol = 1e-10 if a.dtype == torch.float64 else (2e-5 if a.dtype == torch.float32 else 1e-2)
    torch.testing.assert_close(a, b, atol=atol, rtol=atol, equal_nan=True)


def test_build_info_lists_the_variants():
    info = diffcore.build_info()
    assert info["cpu_isas"][0] == "baseline"
    assert info["cpu_isa"] in info["cpu_isas"]


@pytest.mark.slow
def test_every_variant_matches_the_reference_and_the_others(tmp_path):
    results = {isa: _run_variant(isa, tmp_path) for isa in diffcore.build_info()["cpu_isas"]}
    baseline = results["baseline"]["fused"]
    for isa, result in results.items():
        assert result["isa"] == isa  # the variable forced it (every built variant runs on this CPU)
        for op, value in result["fused"].items():
            for fused, ref, base in zip(_flatten(value), _flatten(result["reference"][op]), _flatten(baseline[op])):
                _close(fused, ref)
                _close(fused, base)


def test_unknown_isa_is_an_error_naming_the_variable(tmp_path):
    env = dict(os.environ, DIFFCORE_CPU_ISA="sse9", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", "import torch, diffcore; from diffcore import ops; "
                           "ops.q_sample(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), "
                           "torch.ones(2, dtype=torch.float64), impl='fused')"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "DIFFCORE_CPU_ISA: expected baseline, avx2, avx512 or avx512_bf16, got 'sse9'" in proc.stderr


def test_build_records_the_torch_it_was_built_for():
    record = json.loads((Path(diffcore.__file__).parent / "_build_info.json").read_text())
    assert record["torch_version"] == str(torch.__version__) == diffcore.build_info()["torch_version"]
    assert record["version"] == diffcore.__version__


# Pretends another torch is installed (the extension's record then names a different version), imports diffcore
# with every warning shown, and reports what it said.
MISMATCH_SCRIPT = textwrap.dedent('''
    import json, sys, warnings
    import torch
    torch.__version__ = sys.argv[1]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import diffcore
        from diffcore import ops
        from diffcore.cli.info import info
        impl = ops.which_impl("cpu")
        build, report = diffcore.build_info(), info()
    print(json.dumps({"warnings": [f"{w.category.__name__}: {w.message}" for w in caught], "impl": impl,
                      "build": build, "info_build": report["build"], "info_torch": report["torch"]}))
''')


def test_extension_built_for_another_torch_warns_once_and_falls_back(tmp_path):
    other = "1.99.0"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", MISMATCH_SCRIPT, other], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    mismatch = [w for w in result["warnings"] if w.startswith("ExtensionMismatchWarning")]
    assert len(mismatch) == 1, result["warnings"]
    built_for = str(torch.__version__)
    assert f"built for torch {built_for} but torch {other} is installed" in mismatch[0]
    assert "pip install -e . --no-build-isolation --no-deps" in mismatch[0] and "wheel" in mismatch[0]
    assert result["impl"] == "reference"
    for build in (result["build"], result["info_build"]):
        assert build["built"] is False and build["torch_mismatch"] is True
        assert build["torch_version"] == built_for and other in build["error"]
    assert result["info_torch"] == other
