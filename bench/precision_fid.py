"""FID of diffcore.sample's default sampler (respaced ancestral, 50 steps, x0 clipped) on the packaged model in
bf16 (autocast) and fp32, at the reproduction's seeds (seed k for batch k of 100) and the same count, scored by the
reproduction's scorer (the reference set of docs/reproduction.md); prints JSON lines with the FIDs, the floor, the
scatter of disjoint real sets and the pixel differences. The evidence for ``runtime.SAMPLE_PRECISION``.

    PYTHONPATH=. python bench/precision_fid.py 500     # from the repository root; ~10 min on one idle core
"""
import json
import sys
import time
from pathlib import Path

import torch

from diffcore.pipelines.sample import sample
from reproduction.context import Context
from reproduction.settings import ReproSettings

torch.set_num_threads(1)

n = int(sys.argv[1])
s = ReproSettings()
ctx = Context(settings=s, out_dir=Path("/tmp/precfid"), work_dir=Path("/tmp/precfid/work"), progress=False)
bundle = ctx.packaged_model(); bundle.model.eval()
out = {"n": n, "floor": ctx.scorer.floor(n)["fid"], "spread": ctx.scorer.fid_spread(n)}
images = {}
for precision in ("bf16", "fp32"):
    t0 = time.perf_counter(); parts = []
    for k, start in enumerate(range(0, n, s.batch_size)):
        parts.append(sample(bundle.model, n=min(s.batch_size, n - start), seed=s.seed + k, device="cpu",
                            diffusion=bundle.diffusion, image_shape=bundle.image_shape, progress=False,
                            precision=precision))
    images[precision] = torch.cat(parts)
    r = ctx.scorer.score(images[precision], seed=s.seed)
    out[precision] = {"fid": r["fid"], "kid": r.get("kid"), "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(out), flush=True)
d = (images["bf16"] - images["fp32"]).abs()
out["mean_abs_diff"] = float(d.mean()); out["frac_gt_1_gray"] = float((d > 2 / 255).float().mean())
print(json.dumps(out), flush=True)
