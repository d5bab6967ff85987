"""The reproduction report's pipeline: the quick preset end to end, the stored-results cache, the scorer's real
sets, and the claim checks on fabricated results with known outcomes."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from diffcore.data import fashion_mnist_root
from diffcore.pretrained import default_model_path
from reproduction.cli import main
from reproduction.context import Context, Scorer
from reproduction.report import write_report
from reproduction.settings import ReproSettings
from reproduction.stages import Stage, all_stages, run_stage


def _have_data() -> bool:
    try:
        fashion_mnist_root()
        return True
    except (FileNotFoundError, OSError):
        return False


needs_data = pytest.mark.skipif(not _have_data() or not (default_model_path() / "manifest.json").is_file(),
                                reason="needs Fashion-MNIST (apt-get install dataset-fashion-mnist) and the "
                                       "packaged model")
matplotlib = pytest.importorskip("matplotlib")


@pytest.mark.slow
@needs_data
def test_quick_preset_runs_every_stage_and_the_report_quotes_the_stored_numbers(tmp_path, one_thread):
    out, work = tmp_path / "rep", tmp_path / "work"
    assert main(["--preset", "quick", "--out", str(out), "--work-dir", str(work), "--no-progress"]) == 0
    settings = ReproSettings.quick()
    for stage in all_stages(settings):
        record = json.loads((out / "results" / f"{stage.name}.json").read_text())
        assert record["fingerprint"] == settings.fingerprint(*stage.fields)
    report = (tmp_path / "rep.md").read_text()
    table1 = json.loads((out / "results" / "ddim-table1.json").read_text())["data"]
    from reproduction.claims import fmt

    for eta in settings.ddim_etas:
        row = [run for run in table1["runs"] if run["eta"] == eta]
        expected = f"| eta = {eta:g} | " + " | ".join(fmt(run["fid"]) for run in sorted(row, key=lambda r: r["steps"]))
        assert expected in report
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report) + re.findall(r'<img src="([^"]+)"', report)
    assert len(links) >= 10
    for link in links:
        assert (tmp_path / link).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", link
    assert "Not run yet" not in report
    # the sampler table: every sampler at every budget, the model calls counted during sampling are what the
    # registry's cost formula says (Heun: 2 S - 1 for S steps) and within the budget, and the report quotes the FIDs
    from diffcore.samplers import SAMPLER_INFO, SAMPLERS

    plain = json.loads((out / "results" / "sampler-table.json").read_text())["data"]
    clipped = [json.loads((out / "results" / f"sampler-table-clipped-{name}.json").read_text())["data"]
               for name in SAMPLERS]
    assert not plain["clip_denoised"] and all(part["clip_denoised"] for part in clipped)
    for runs in (plain["runs"], [run for part in clipped for run in part["runs"]]):
        assert {(run["sampler"], run["target_evaluations"]) for run in runs} == {
            (name, k) for name in SAMPLERS for k in settings.sampler_evaluations}
        for run in runs:
            assert run["evaluations"] == SAMPLER_INFO[run["sampler"]].model_calls(run["steps"]) \
                <= run["target_evaluations"]
            assert run["evaluations"] >= run["target_evaluations"] - 1 and run["visited"] == run["steps"]
            assert run["n"] == settings.sampler_samples
        for name in SAMPLERS:
            fids = [run["fid"] for run in sorted(runs, key=lambda r: r["target_evaluations"]) if run["sampler"] == name]
            assert f"| `{name}` | {SAMPLER_INFO[name].order} | " in report
            assert " / ".join(fmt(v) for v in fids) in report
    # DPS: every task's row is there, and its PSNR matches the stored mean
    dps = json.loads((out / "results" / "dps-sr4.json").read_text())["data"]
    assert f"{dps['restored']['psnr']['mean']:.2f} +- " in report


def test_stored_results_are_reused_only_while_their_settings_match(tmp_path):
    calls = []

    def compute(ctx):
        calls.append(ctx.settings.num_samples)
        return {"value": len(calls)}

    stage = Stage("toy", compute, ("num_samples",))
    ctx = Context(ReproSettings.quick(), tmp_path, tmp_path / "work", progress=False)
    first = run_stage(ctx, stage)
    assert run_stage(ctx, stage)["data"] == first["data"] and calls == [8]
    ctx.settings = ReproSettings.quick().__class__(**{**ReproSettings.quick().to_dict(), "ddim_etas": (0.5,)})
    assert run_stage(ctx, stage)["data"] == {"value": 1} and calls == [8]  # an unrelated field changed
    ctx.settings = ReproSettings(**{**ReproSettings.quick().to_dict(), "num_samples": 9})
    assert run_stage(ctx, stage)["data"] == {"value": 2} and calls == [8, 9]
    ctx.force = True
    assert run_stage(ctx, stage)["data"] == {"value": 3}
    assert not list(tmp_path.glob("results/.*tmp*"))  # atomic writes leave no temporary files


@needs_data
def test_scorer_sets_are_disjoint_and_the_reference_scores_zero_against_itself():
    real = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (60, 1, 28, 28), dtype=np.uint8))
    scorer = Scorer(real, num_reference=20, seed=3)
    assert len(set(scorer.reference_index) & set(scorer.held_out_index)) == 0
    assert len(scorer.reference_index) + len(scorer.held_out_index) == 60
    own = scorer.score(real[torch.as_tensor(scorer.reference_index)].float() / 127.5 - 1.0)
    assert own["fid"] == pytest.approx(0.0, abs=1e-6)
    assert scorer.floor(10) == scorer.score(scorer.held_out(10))
    assert scorer.floor(10)["fid"] > 1.0
    with pytest.raises(ValueError, match="held-out"):
        scorer.held_out(41)


def _fake_table1(settings, fid):
    runs = [{"sampler": "ddim", "steps": k, "eta": eta, "fid": fid(eta, k), "kid": 0.1, "precision": 0.5,
             "recall": 0.5, "seconds": 1.0} for eta in settings.ddim_etas for k in settings.ddim_steps]
    description = {"schedule": "cosine", "num_timesteps": 1000, "prediction_type": "eps",
                   "variance_type": "learned_range", "train_steps": 6000, "parameters": 1_743_170}
    return {"model": "packaged", "description": description, "runs": runs,
            "floor": {"fid": 1.0, "kid": 0.0, "precision": 1, "recall": 1}}


@pytest.mark.parametrize("paper_like", [True, False])
def test_table1_claims_follow_the_stored_numbers(tmp_path, paper_like):
    settings = ReproSettings(ddim_steps=(10, 100), ddim_etas=(0.0, 1.0))
    ctx = Context(settings, tmp_path / "rep", tmp_path / "work", progress=False)
    stages = all_stages(settings)
    table1 = next(s for s in stages if s.name == "ddim-table1")
    if paper_like:  # falls with S, grows with eta
        fid = lambda eta, k: (100.0 / k) * (1 + eta)  # noqa: E731
    else:  # eta = 1 beats eta = 0 at S = 10, and eta = 1 gets worse with more steps
        fid = lambda eta, k: {(0.0, 10): 20.0, (0.0, 100): 5.0, (1.0, 10): 10.0, (1.0, 100): 12.0}[(eta, k)]  # noqa: E731
    ctx.store.save("ddim-table1", settings.fingerprint(*table1.fields), _fake_table1(settings, fid), 0.0)
    path = write_report(ctx, stages, tmp_path / "rep.md")
    text = path.read_text()
    steps_row = next(line for line in text.splitlines() if line.startswith("| FID falls as S grows"))
    eta_row = next(line for line in text.splitlines() if line.startswith("| at few steps"))
    if paper_like:
        assert steps_row.endswith("| yes |") and eta_row.endswith("| yes |")
        assert "No checked trend is contradicted beyond the noise." in text
    else:
        assert steps_row.endswith("| **no** |") and eta_row.endswith("| **no** |")
        assert "rises with S beyond noise for eta=1: eta=0: 20.0, 5.00; eta=1: 10.0, 12.0" in steps_row
        assert "eta = 1 from S = 10 to 100 (10.0 -> 12.0)" in text  # the computed explanation
        assert "Where we disagree" in text and "stochasticity" in text
    assert "Not run yet: stage `ddim-table2`" in text  # the stages without results say so


def test_comparisons_within_the_noise_are_ties():
    from reproduction.claims import combine, decreasing, lower

    assert lower(10.0, 20.0, 5.0) is True and lower(20.0, 10.0, 5.0) is False and lower(12.0, 10.0, 5.0) is None
    assert combine([True, None]) is None and combine([True, False, None]) is False and combine([True]) is True
    assert decreasing([10.0, 11.0, 5.0], tolerance=2.0) and not decreasing([10.0, 13.0], tolerance=2.0)
