"""Writes docs/reproduction.md from the stored stage results: tables, figures and the checked claims. Every number
comes from ``results/*.json`` (written by the stages); a stage that has not run is reported as missing."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from diffcore.outputs import atomic_write_text
from diffcore.metrics import load_feature_extractor
from reproduction.claims import EXPLANATIONS, Claim, combine, decreasing, fmt, increasing, lower, verdict
from reproduction.context import Context
from reproduction.plots import line_plot
from reproduction.idpm import train_config
from reproduction.report_samplers import sampler_section
from reproduction.settings import small_unet
from reproduction.stages import Stage, long_stage_name

FEATURES_NOTE = (
    "FID, KID, precision and recall are computed in the feature space of diffcore's own Fashion-MNIST classifier "
    "(`diffcore/assets/fmnist_classifier.safetensors`, test accuracy {accuracy}), not Inception: they compare runs "
    "within this report only, never with the papers' numbers. Every configuration is scored with the same number "
    "of samples against the same reference set of real test images; the *floor* is a disjoint set of as many "
    "real test images scored the same way (what a perfect generator would get at that count).")


class Report:
    """Collects markdown sections, figures and claims; ``rel`` is the figures folder relative to the markdown."""

    def __init__(self, ctx: Context, stages: Sequence[Stage], path: Path):
        self.ctx, self.path = ctx, path
        self.stages = {stage.name: stage for stage in stages}
        self.lines: list[str] = []
        self.claims: list[Claim] = []
        self.records: dict[str, dict[str, Any]] = {}
        try:
            self.rel = ctx.figures.resolve().relative_to(path.parent.resolve()).as_posix()
        except ValueError:
            self.rel = ctx.figures.resolve().as_posix()

    def result(self, name: str) -> Optional[dict[str, Any]]:
        """The stored data of stage ``name`` when its settings fingerprint matches (read once), else None."""
        if name in self.records:
            return self.records[name]["data"]
        stage = self.stages.get(name)
        if stage is None:
            return None
        record = self.ctx.store.load(name, self.ctx.settings.fingerprint(*stage.fields))
        if record is not None:
            self.records[name] = record
        return None if record is None else record["data"]

    def fid_tolerance(self, n: int) -> float:
        """Two standard deviations of the FID of disjoint real sets of ``n`` images (the ``fid-noise`` stage); 0
        when it has not run."""
        data = self.result("fid-noise")
        for row in (data or {}).get("spread", []):
            if row["n"] == n:
                return 2.0 * row["std"]
        return 0.0

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def figure(self, filename: str, caption: str) -> None:
        self.add(f"![{caption}]({self.rel}/{filename})", "")

    def grid(self, filename: str, caption: str, scale: int = 3) -> None:
        """A sample grid, shown ``scale`` times its pixel size (28 x 28 images are too small to judge)."""
        from PIL import Image

        path = self.ctx.figures / filename
        if not path.is_file():
            return self.add(f"*(missing picture {filename})*", "")
        with Image.open(path) as picture:
            width = picture.width * scale
        self.add(f'<img src="{self.rel}/{filename}" width="{width}" alt="{caption}">', "")

    def missing(self, what: str, stage: str) -> None:
        self.add(f"*Not run yet: stage `{stage}` ({what}). Run `python scripts/reproduce.py --stages {stage}`.*", "")

    def table(self, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        self.add("| " + " | ".join(header) + " |", "|" + "---|" * len(header))
        for row in rows:
            self.add("| " + " | ".join(str(c) for c in row) + " |")
        self.add("")


# --------------------------------------------------------------------------------------------------- sections
def _ddim_table1(r: Report) -> None:
    s = r.ctx.settings
    r.add("## 1. DDIM Table 1: FID against steps S and eta (packaged model)", "")
    data, anc = r.result("ddim-table1"), r.result("packaged-samplers")
    if data is None:
        return r.missing("DDIM Table 1", "ddim-table1")
    long_runs = []
    for eta in s.ddim_long_etas:
        stored = r.result(long_stage_name(eta))
        if stored is None:
            r.missing(f"Table 1 at S = {s.ddim_long_steps}, eta = {eta:g}", long_stage_name(eta))
        else:
            long_runs += stored["runs"]
    runs = data["runs"] + long_runs
    steps = sorted({run["steps"] for run in runs})
    fid = {(run["eta"], run["steps"]): run["fid"] for run in runs}
    ancestral = {run["steps"]: run["fid"] for run in (anc["runs"] if anc else []) if run["sampler"] == "ddpm"}
    m = data["description"]
    r.add(f"{s.num_samples} samples per cell, DDIM on the packaged model ({m['parameters']:,} parameters, trained "
          f"{m['train_steps']} steps; {m['schedule']} schedule, T = {m['num_timesteps']}, {m['prediction_type']} "
          f"prediction, {m['variance_type']} variance, which DDIM ignores), clip x0 to [-1, 1], the same x_T in "
          f"every cell (seed {s.seed}). The last "
          f"row is I-DDPM ancestral sampling with the learned variance on the process respaced to S steps (the "
          f"DDIM paper's last row is DDPM with the larger variance beta_t; ours is the model's own variance). "
          f"Floor (real vs real, n = {s.num_samples}): FID {fmt(data['floor']['fid'])}.", "")
    rows = [[f"eta = {eta:g}"] + [fmt(fid[(eta, k)]) if (eta, k) in fid else "-" for k in steps]
            for eta in s.ddim_etas]
    if ancestral:
        rows.append(["ancestral, learned variance"] + [fmt(ancestral[k]) if k in ancestral else "-" for k in steps])
    r.table(["FID", *[f"S = {k}" for k in steps]], rows)

    def cells(eta):
        return [k for k in steps if (eta, k) in fid]

    series = [(f"DDIM eta={eta:g}", cells(eta), [fid[(eta, k)] for k in cells(eta)], "o-") for eta in s.ddim_etas]
    if ancestral:
        ks = sorted(ancestral)
        series.append(("ancestral (learned variance)", ks, [ancestral[k] for k in ks], "s--"))
    line_plot(r.ctx.figures / "table1_fid.png", series, xlabel="sampling steps S", ylabel="FID (classifier features)",
              title="DDIM Table 1 analogue (packaged model)", logx=True, logy=True,
              hlines=[("real floor", data["floor"]["fid"])])
    r.figure("table1_fid.png", "FID against S for each eta")
    r.add("<details><summary>KID, precision, recall and sampling time of every cell</summary>", "")
    r.table(["eta", "S", "FID", "KID", "precision", "recall", "seconds"],
            [[f"{run['eta']:g}", run["steps"], fmt(run["fid"]), fmt(run["kid"]), fmt(run["precision"]),
              fmt(run["recall"]), run["seconds"]] for run in runs])
    r.add("</details>", "")
    lo, hi = min(s.ddim_etas), max(s.ddim_etas)
    shown = [(lo, min(steps)), (lo, max(cells(lo))), (hi, max(cells(hi)))]
    for eta, k in shown:
        r.grid(f"table1_eta{eta:g}_S{k}.png", f"eta={eta:g}, S={k}")
    r.add("Samples (first 16, same x_T): " + ", ".join(f"eta={eta:g} at S={k}" for eta, k in shown) + ".", "")
    per_eta = {eta: [fid[(eta, k)] for k in cells(eta)] for eta in s.ddim_etas}
    tol = r.fid_tolerance(s.num_samples)
    bad = [f"eta={eta:g}" for eta, values in per_eta.items() if not decreasing(values, tol)]
    steps_trend = (False if bad else
                   None if any(values[0] - values[-1] <= tol for values in per_eta.values()) else True)
    rises = []
    for eta in s.ddim_etas:
        ks = cells(eta)
        rises += [f"eta = {eta:g} from S = {a} to {b} ({fmt(fid[(eta, a)])} -> {fmt(fid[(eta, b)])})"
                  for a, b in zip(ks, ks[1:]) if fid[(eta, b)] > fid[(eta, a)] + tol]
    steps_explanation = None
    if rises:
        steps_explanation = (
            "FID rises beyond the noise for " + "; ".join(rises) + ". With many steps the deterministic sampler "
            "integrates the learned probability-flow ODE almost exactly, so its FID becomes that of the model's "
            "ODE rather than of a discretization; that it is worse than with fewer steps says this weakly trained "
            "model's ODE transports noise to data less well than its stochastic counterparts (next claims), which "
            "keep improving. The DDIM paper's well-trained models improve up to S = 1000. Not isolated further.")
    r.claims.append(Claim("ddim-steps", "FID falls as S grows, for every eta (Table 1)",
                          "FID falls with S for every eta (within noise)" if not bad else
                          f"rises with S beyond noise for {', '.join(bad)}: " + "; ".join(
                              f"eta={eta:g}: " + ", ".join(fmt(v) for v in per_eta[eta]) for eta in s.ddim_etas),
                          steps_trend, steps_explanation))
    small = min(steps)
    at_small = [fid[(eta, small)] for eta in s.ddim_etas]
    eta_trend = (False if not increasing(at_small, tol) else
                 None if at_small[-1] - at_small[0] <= tol else True)
    r.claims.append(Claim("ddim-eta", f"at few steps (S = {small}) FID grows with eta; eta = 0 is best",
                          f"S = {small}: " + ", ".join(f"eta={eta:g}: {fmt(v)}" for eta, v in
                                                       zip(s.ddim_etas, at_small)), eta_trend))
    lo, hi = min(s.ddim_etas), max(s.ddim_etas)
    both = [k for k in steps if (lo, k) in fid and (hi, k) in fid]
    if len(both) >= 2:
        gaps = {k: fid[(hi, k)] - fid[(lo, k)] for k in (both[0], both[-1])}
        r.claims.append(Claim("ddim-gap", f"the FID gap between eta = {hi:g} and eta = {lo:g} shrinks as S grows",
                              ", ".join(f"S = {k}: {fmt(g)}" for k, g in gaps.items()),
                              lower(abs(gaps[both[-1]]), abs(gaps[both[0]]), tol), _cosine_ddim_evidence(r)))


def _ancestral_vs_ddim(r: Report) -> None:
    r.add("## 2. Learned-variance ancestral sampling against DDIM with the same steps (packaged model)", "")
    anc, table1 = r.result("packaged-samplers"), r.result("ddim-table1")
    if anc is None:
        return r.missing("ancestral vs DDIM", "packaged-samplers")
    ddim = {run["steps"]: run["fid"] for run in anc["runs"] if run["sampler"] == "ddim"}
    if table1:
        ddim.update({run["steps"]: run["fid"] for run in table1["runs"] if run["eta"] == 0.0})
    ancestral = {run["steps"]: run["fid"] for run in anc["runs"] if run["sampler"] == "ddpm"}
    steps = sorted(set(ancestral) & set(ddim))
    spacing = r.result("ddim-spacing")
    even = {run["steps"]: run for run in spacing["runs"]} if spacing else {}
    r.add("I-DDPM Figure 8 compares ancestral sampling of a learned-variance model on a respaced process with "
          "DDIM (eta = 0) at equal step counts. Same model, same x_T, same sample count as section 1. DDIM uses "
          "ermongroup/ddim's uniform spacing range(0, T, T/S), whose first step is t = T - T/S, while the respaced "
          "ancestral sampler starts at t = T - 1; the last rows run DDIM with the respacing's even spacing (first "
          "step T - 1) to separate the sampler from the spacing (`ddim-spacing` stage).", "")
    rows = [["ancestral, learned variance"] + [fmt(ancestral[k]) for k in steps],
            ["DDIM, eta = 0, uniform spacing"] + [fmt(ddim[k]) for k in steps]]
    if even:
        rows.append(["DDIM, eta = 0, even spacing (first step T - 1)"]
                    + [fmt(even[k]["fid"]) if k in even else "-" for k in steps])
        rows.append(["sqrt(abar) at uniform spacing's first step"]
                    + [f"{even[k]['uniform_first_sqrt_abar']:.3f}" if k in even else "-" for k in steps])
    else:
        r.missing("DDIM with even spacing", "ddim-spacing")
    r.table(["FID", *[f"S = {k}" for k in steps]], rows)
    r.grid(f"ancestral_S{max(steps)}.png", f"ancestral, S={max(steps)}")
    r.add(f"Ancestral samples at S = {max(steps)} (first 16).", "")
    few = [k for k in steps if k < 50]
    many = [k for k in steps if k >= 50]
    tol = r.fid_tolerance(r.ctx.settings.num_samples)
    ok = combine([lower(ddim[k], ancestral[k], tol) for k in few] + [lower(ancestral[k], ddim[k], tol) for k in many])
    if even:
        shared = [k for k in steps if k in even]
        better = [k for k in shared if even[k]["fid"] < ddim[k]]
        r.add(f"Starting DDIM at t = T - 1 changes its FID at S = {', '.join(map(str, shared))}: better at "
              f"{len(better)} of {len(shared)} counts.", "")
    r.claims.append(Claim("ancestral-vs-ddim",
                          "DDIM is better below 50 steps, learned-variance ancestral sampling at 50 steps and more "
                          "(I-DDPM Fig. 8)",
                          "; ".join(f"S = {k}: ancestral {fmt(ancestral[k])} vs DDIM {fmt(ddim[k])}" for k in steps),
                          ok, _cosine_ddim_evidence(r)))


def _cosine_ddim_evidence(r: Report) -> Optional[str]:
    """What the small models (trained alike, linear and cosine) say about DDIM against ancestral sampling."""
    s = r.ctx.settings
    k = max(s.respaced_steps)
    fids = {}
    for name in s.small_model_names:
        d = r.result(f"idpm-{name}")
        if d is not None:
            fid = {(run["sampler"], run["steps"]): run["fid"] for run in d["samplers"]}
            fids[name] = (fid[("ddim", k)], fid[("ddpm", k)])
    ddim = {schedule: [v[0] for n, v in fids.items() if n.endswith(schedule)] for schedule in ("linear", "cosine")}
    if not (ddim["linear"] and ddim["cosine"]):
        return None
    tol = r.fid_tolerance(s.num_samples)
    text = (f"Section 4's small models, trained alike, point at the schedule: at {k} steps, DDIM / ancestral FID "
            f"is " + ", ".join(f"{n} {fmt(a)} / {fmt(b)}" for n, (a, b) in fids.items()) + ". ")
    if min(ddim["cosine"]) > max(ddim["linear"]) + tol:
        text += ("DDIM is worse on every cosine model than on every linear one, while ancestral sampling is not, "
                 "and the packaged model uses the cosine schedule. ")
    if "simple-linear" in fids and lower(*fids["simple-linear"], tol) is None:
        text += ("In the DDIM paper's own setting (linear schedule, L_simple, fixed variance) DDIM and ancestral "
                 "sampling tie. ")
    return text + ("Stochastic steps (eta > 0, ancestral) also correct part of the errors of earlier steps, which "
                   "the deterministic path cannot (Karras et al. 2022, sec. 4); with a weakly trained model that "
                   "matters more than discretization error. We have not isolated the cause further.")


def _inversion(r: Report) -> None:
    r.add("## 3. DDIM Table 2: reconstruction error after encoding to x_T and decoding (packaged model)", "")
    data = r.result("ddim-table2")
    if data is None:
        return r.missing("DDIM Table 2", "ddim-table2")
    rows = data["rows"]
    r.add(f"{data['images']} held-out test images x_0 are encoded with the DDIM ODE (S steps, `ddim_invert`) and "
          f"decoded with DDIM eta = 0 (same S). Error: mean over images of ||x_0 - x_0'||^2 / d, with pixels in "
          f"[-1, 1] (divide by 4 for [0, 1] pixels), +- standard error.", "")
    r.table(["S", "error per dim ([-1, 1])", "error per dim ([0, 1])", "std of x_T", "seconds"],
            [[row["steps"], f"{row['mse']['mean']:.4g} +- {row['mse']['sem']:.2g}", f"{row['mse']['mean'] / 4:.3g}",
              f"{row['latent_std']:.3f}", row["seconds"]] for row in rows])
    line_plot(r.ctx.figures / "table2_error.png",
              [("reconstruction error", [row["steps"] for row in rows], [row["mse"]["mean"] for row in rows], "o-")],
              xlabel="steps S", ylabel="error per dimension ([-1, 1] pixels)", title="DDIM Table 2 analogue",
              logx=True, logy=True)
    r.figure("table2_error.png", "reconstruction error against S")
    r.grid("table2_reconstructions.png", "inputs and reconstructions")
    r.add("Top row: inputs; then the reconstructions for each S in the table's order.", "")
    errors = [row["mse"]["mean"] for row in rows]
    agrees = decreasing(errors)
    r.claims.append(Claim("inversion", "reconstruction error falls as S grows (Table 2)",
                          ", ".join(f"{e:.3g}" for e in errors) + f" for S = {', '.join(str(x['steps']) for x in rows)}",
                          agrees, None if agrees else _terminal_step_explanation(rows)))


def _terminal_step_explanation(rows: list[dict]) -> Optional[str]:
    """Why DDIM inversion breaks when the kept steps include t = T - 1 of a schedule whose abar_{T-1} is ~0."""
    from diffcore.pretrained import load_default
    from diffcore.schedules import make_schedule

    diffusion = load_default().diffusion
    abar = diffusion.alphas_cumprod.double().cpu()
    T = diffusion.num_timesteps
    reaching = [row["steps"] for row in rows if (T - 1) % (T // row["steps"]) == 0]
    if not reaching or abar[T - 1] > 1e-6:
        return None
    linear = make_schedule("linear", T).alphas_cumprod.double()[-1]
    shorter = [row for row in rows if row["steps"] not in reaching]
    text = (f"With S = {', '.join(map(str, reaching))} the uniform spacing keeps t = T - 1 = {T - 1}, where the "
            f"packaged model's cosine schedule (betas clipped at 0.999) has abar = {float(abar[T - 1]):.1e}. "
            f"Decoding starts with x0_hat = (x_T - sqrt(1 - abar) eps_hat) / sqrt(abar), so any difference between "
            f"the eps the encoder used to reach x_T and the eps the decoder predicts there is multiplied by "
            f"1 / sqrt(abar) = {float(abar[T - 1].rsqrt()):.0e}. The DDIM paper's models use the linear schedule "
            f"(abar_(T-1) = {float(linear):.1e}), where this step is benign. ")
    if shorter:
        trend = ("falls with S as in the paper" if decreasing([row["mse"]["mean"] for row in shorter])
                 else "does not fall monotonically either")
        text += (f"With S = {', '.join(str(row['steps']) for row in shorter)} the last kept step is t = T - T/S "
                 f"(abar >= {float(abar[T - T // max(row['steps'] for row in shorter)]):.1e}) and the error {trend}. ")
    return text + ("Inverting with all T steps of a cosine schedule needs the step at T - 1 left out (or x0_hat "
                   "clipped).")


def _small_models(r: Report) -> None:
    s = r.ctx.settings
    r.add("## 4. I-DDPM: L_simple against L_hybrid, linear against cosine (small models trained alike)", "")
    models = {name: r.result(f"idpm-{name}") for name in s.small_model_names}
    done = {k: v for k, v in models.items() if v is not None}
    for name in models:
        if models[name] is None:
            r.missing(f"small model {name}", f"idpm-{name}")
    if not done:
        return
    any_model = next(iter(done.values()))
    unet = small_unet(True)
    r.add(f"Each model: the same U-Net ({any_model['parameters']:,} parameters with learned variance; "
          f"{unet.model_channels} base channels, multipliers {tuple(unet.channel_mult)}, {unet.num_res_blocks} res "
          f"blocks per level, attention at {', '.join(f'{a} x {a}' for a in unet.attention_resolutions)}), "
          f"T = {train_config(r.ctx, next(iter(done))).num_timesteps}, "
          f"eps prediction, "
          f"{s.small_train_steps} steps of batch {s.small_batch_size} on Fashion-MNIST (lr {s.small_lr}, EMA "
          f"{s.small_ema_rate}), seed {s.seed}. L_simple models use the fixed variance beta_t (improved-diffusion's "
          f"choice without learned sigmas); L_hybrid = L_simple + 0.001 L_vb with a learned range. Bits/dim: the full "
          f"variational bound over all T steps on {s.bpd_images} test images (+- standard error). FID: "
          f"{s.num_samples} samples, ancestral on the respaced process and DDIM (eta = 0).", "")
    steps = list(s.respaced_steps)
    header = ["model", "schedule", "loss", "final mse", "bits/dim"]
    header += [f"FID anc. {k}" for k in steps] + [f"FID DDIM {k}" for k in steps]
    rows = []
    for name, d in done.items():
        fid = {(run["sampler"], run["steps"]): run["fid"] for run in d["samplers"]}
        log = [row for row in d["train"]["log"] if row.get("mse") is not None]
        tail = log[-4:]
        final_mse = sum(row["mse"] for row in tail) / len(tail) if tail else None
        rows.append([name, d["schedule"], "L_hybrid" if d["loss_type"] == "rescaled_mse" else "L_simple",
                     fmt(final_mse), f"{d['bpd']['bpd']:.3f} +- {d['bpd']['sem']:.3f}"]
                    + [fmt(fid.get(("ddpm", k))) for k in steps] + [fmt(fid.get(("ddim", k))) for k in steps])
    r.table(header, rows)
    r.add("'final mse' is the mean of the last four logged training-loss means (eps mse); it does not compare "
          "across schedules, which weight the timesteps differently.", "")
    ddim_fid = {d["schedule"]: [] for d in done.values()}
    for d in done.values():
        ddim_fid[d["schedule"]] += [run["fid"] for run in d["samplers"] if run["sampler"] == "ddim"]
    if ddim_fid.get("cosine") and ddim_fid.get("linear") and min(ddim_fid["cosine"]) > max(ddim_fid["linear"]):
        r.add("DDIM (uniform spacing) does worse on every cosine model than on every linear one, while ancestral "
              "sampling does better on cosine: DDIM's first step t = T - T/S keeps a larger share of the image "
              "under the cosine schedule (see section 2).", "")
    series = []
    for index, (name, d) in enumerate(done.items()):
        fid = {(run["sampler"], run["steps"]): run["fid"] for run in d["samplers"]}
        series.append((f"{name} ancestral", steps, [fid[("ddpm", k)] for k in steps], f"C{index}o-"))
        series.append((f"{name} DDIM", steps, [fid[("ddim", k)] for k in steps], f"C{index}x--"))
    line_plot(r.ctx.figures / "idpm_fid_steps.png", series, xlabel="sampling steps", ylabel="FID",
              title="I-DDPM Fig. 8 analogue (small models)", logx=True)
    r.figure("idpm_fid_steps.png", "FID against sampling steps for each small model")
    curves = []
    for name, d in done.items():
        log = [row for row in d["train"]["log"] if row.get("mse") is not None]
        curves.append((name, [row["step"] for row in log], [row["mse"] for row in log], "-"))
    line_plot(r.ctx.figures / "idpm_train_mse.png", curves, xlabel="training step", ylabel="eps mse (training)",
              title="Training loss of the small models", logy=True)
    r.figure("idpm_train_mse.png", "training mse of the small models")
    for name in done:
        r.grid(f"idpm_{name}_ancestral{max(steps)}.png", f"{name}, ancestral {max(steps)} steps")
    r.add(f"Samples, ancestral {max(steps)} steps, in the table's order: " + ", ".join(done) + ".", "")
    _small_model_claims(r, done, steps)


def _small_model_claims(r: Report, done: dict[str, dict], steps: list[int]) -> None:
    bpd = {name: d["bpd"]["bpd"] for name, d in done.items()}
    fid = {name: {(run["sampler"], run["steps"]): run["fid"] for run in d["samplers"]} for name, d in done.items()}
    for schedule in ("linear", "cosine"):
        simple, hybrid = f"simple-{schedule}", f"hybrid-{schedule}"
        if simple in bpd and hybrid in bpd:
            r.claims.append(Claim("hybrid-bpd", f"L_hybrid gives better bits/dim than L_simple ({schedule})",
                                  f"{fmt(bpd[hybrid])} vs {fmt(bpd[simple])}", bpd[hybrid] < bpd[simple]))
            k_lo, k_hi = min(steps), max(steps)
            rise = {n: fid[n][("ddpm", k_lo)] / fid[n][("ddpm", k_hi)] for n in (simple, hybrid)}
            r.claims.append(Claim("hybrid-few-steps",
                                  f"with fewer respaced ancestral steps, L_hybrid's FID degrades less than "
                                  f"L_simple's ({schedule}; I-DDPM Fig. 8)",
                                  f"FID({k_lo}) / FID({k_hi}): hybrid {rise[hybrid]:.2f}, simple {rise[simple]:.2f}",
                                  rise[hybrid] < rise[simple]))
    for loss in ("simple", "hybrid"):
        linear, cosine = f"{loss}-linear", f"{loss}-cosine"
        if linear in bpd and cosine in bpd:
            r.claims.append(Claim("cosine-bpd", f"the cosine schedule gives better bits/dim than linear (L_{loss})",
                                  f"{fmt(bpd[cosine])} vs {fmt(bpd[linear])}", bpd[cosine] < bpd[linear]))
            k = max(steps)
            r.claims.append(Claim("cosine-fid", f"the cosine schedule gives better FID than linear (L_{loss}, "
                                                f"ancestral {k} steps)",
                                  f"{fmt(fid[cosine][('ddpm', k)])} vs {fmt(fid[linear][('ddpm', k)])}",
                                  lower(fid[cosine][("ddpm", k)], fid[linear][("ddpm", k)],
                                        r.fid_tolerance(r.ctx.settings.num_samples))))


def _dps(r: Report) -> None:
    s = r.ctx.settings
    r.add("## 5. DPS against each task's baseline (packaged model)", "")
    done = {task: r.result(f"dps-{task}") for task in s.dps_tasks}
    for task, d in done.items():
        if d is None:
            r.missing(f"DPS on {task}", f"dps-{task}")
    done = {k: v for k, v in done.items() if v is not None}
    if not done:
        return
    r.add(f"{s.dps_images} held-out test images per task, Gaussian measurement noise sigma_y = {s.dps_sigma_y} "
          f"(images in [-1, 1]); DPS with {s.dps_steps} respaced ancestral steps (the paper uses all 1000), zeta = "
          f"{s.dps_zeta} / ||A||_2, the same seed for all. Baselines: naive inpainting (sampling with the known "
          f"pixels replaced by their noised values at every step) for masks, nearest up-sampling for x4 pooling, "
          f"damped least squares for blurs, filtered back-projection for CT. PSNR (dB) and SSIM are means +- "
          f"standard error against the ground truth; FID of the {s.dps_images} restorations against the reference "
          f"set, next to the ground truths' own FID (the floor at n = {s.dps_images}).", "")
    rows = []
    for task, d in done.items():
        deg = d["degraded"]
        rows.append([task, d["baseline_name"],
                     f"{deg['psnr']['mean']:.2f}" if deg else "-",
                     f"{d['baseline']['psnr']['mean']:.2f} +- {d['baseline']['psnr']['sem']:.2f}",
                     f"{d['restored']['psnr']['mean']:.2f} +- {d['restored']['psnr']['sem']:.2f}",
                     f"{d['baseline']['ssim']['mean']:.3f}", f"{d['restored']['ssim']['mean']:.3f}",
                     fmt(d["fid"]["baseline"]["fid"]), fmt(d["fid"]["restored"]["fid"]),
                     fmt(d["fid"]["floor"]["fid"]), d["seconds"]])
    r.table(["task", "baseline", "PSNR input", "PSNR baseline", "PSNR DPS", "SSIM baseline", "SSIM DPS",
             "FID baseline", "FID DPS", "FID floor", "DPS+baseline s"], rows)
    for task in done:
        r.grid(f"dps_{task}.png", f"DPS on {task}")
    r.add("Each picture: ground truth, the degraded input (where it is an image), the baseline, DPS.", "")
    tol = r.fid_tolerance(s.dps_images)
    fid_verdicts = {t: lower(d["fid"]["restored"]["fid"], d["fid"]["baseline"]["fid"], tol) for t, d in done.items()}

    def psnr_margin(d):  # two standard errors of the difference (unpaired: conservative)
        return 2.0 * (d["restored"]["psnr"]["sem"] ** 2 + d["baseline"]["psnr"]["sem"] ** 2) ** 0.5

    psnr_verdicts = {t: lower(-d["restored"]["psnr"]["mean"], -d["baseline"]["psnr"]["mean"], psnr_margin(d))
                     for t, d in done.items()}
    for key, paper, verdicts in (
            ("dps-fid", "DPS has a better FID than the baselines on every task (DPS Tables 1-3)", fid_verdicts),
            ("dps-psnr", "DPS has a better PSNR than the baselines (the paper: mostly, not always)", psnr_verdicts)):
        counts = {name: [t for t, v in verdicts.items() if v is value]
                  for name, value in (("better", True), ("worse", False), ("tied", None))}
        observed = "; ".join(f"{name} on {len(ts)} of {len(done)}" + (f" ({', '.join(ts)})" if ts and name != "better"
                                                                      else "") for name, ts in counts.items() if ts)
        r.claims.append(Claim(key, paper, observed, combine(list(verdicts.values()))))


def _speed(r: Report) -> None:
    r.add("## 6. Sampling speed (packaged model)", "")
    data = r.result("speed")
    if data is None:
        return r.missing("sampling speed", "speed")
    machine = r.records["speed"]["machine"]
    r.add(f"Batch {data['batch']}, {data['threads']} torch threads on {machine['cpu']} ({machine['cores']} cores), "
          f"torch {machine['torch']}; wall time of whole sampling calls, median of the repeats. The U-Net "
          f"({data['parameters']:,} parameters) dominates every step on the CPU; the fused step ops' own gains are "
          f"in bench/RESULTS.md.", "")
    by_name = {row["config"]: row for row in data["rows"]}
    fused = next((row for name, row in by_name.items() if name.startswith("DDIM eta=0, 50 steps")
                  and "reference" not in name), None)
    reference = next((row for name, row in by_name.items() if "reference" in name), None)
    if fused and reference:
        r.add(f"DDIM-50 with the fused step ops: {fused['images_per_s']:.2f} images/s, with the pure-torch "
              f"reference ops: {reference['images_per_s']:.2f} images/s: on this model and machine the step ops are "
              f"too small a share of a step for their speed-up to show.", "")
    r.table(["configuration", "network evaluations", "repeats", "seconds", "images/s", "ms per image per step"],
            [[row["config"], row["network_evaluations"], row["repeats"], f"{row['seconds']:.2f}",
              f"{row['images_per_s']:.2f}", f"{row['ms_per_image_step']:.2f}"] for row in data["rows"]])


def _claims(r: Report) -> None:
    r.add("## 8. The papers' claims, checked", "")
    if not r.claims:
        return r.add("*No results yet.*", "")
    spread = (r.result("fid-noise") or {}).get("spread", [])
    if spread:
        r.add("FID noise: the FID of disjoint sets of real held-out images against the same reference scatters by "
              + ", ".join(f"sigma = {fmt(row['std'])} at n = {row['n']} ({row['sets']} sets, mean "
                          f"{fmt(row['mean'])})" for row in spread)
              + ". A FID difference within 2 sigma is called a tie; our sampler configurations share x_T, so their "
                "differences are less noisy than independent sets and this rule is conservative. PSNR differences "
                "within two standard errors are ties too.", "")
    r.table(["claim", "here", "agrees"], [[c.paper, c.observed, verdict(c.agrees)] for c in r.claims])
    failed = [c for c in r.claims if c.agrees is False]
    r.add("### Where we disagree, and why", "")
    if not failed:
        r.add("No checked trend is contradicted beyond the noise.", "")
    seen_keys: set[str] = set()
    seen_texts: dict[str, str] = {}
    for claim in failed:
        if claim.key in seen_keys:
            continue
        seen_keys.add(claim.key)
        text = claim.explanation or EXPLANATIONS.get(claim.key, "No explanation recorded.")
        if text in seen_texts:
            text = f"The same as for '{seen_texts[text]}' above."
        else:
            seen_texts[text] = claim.paper
        r.add(f"- **{claim.paper}** — {text}")
    ties = [c.paper for c in r.claims if c.agrees is None]
    if ties:
        r.add("", "Too close to call at these sample counts: " + "; ".join(ties) + ".")
    r.add("")


def _header(r: Report) -> None:
    s = r.ctx.settings
    r.add("# Reproducing the papers' claims with diffcore", "",
          "Generated by `python scripts/reproduce.py` (preset `%s`); every number below is read from "
          "`%s/results/*.json`, which that script writes (re-run one stage with `--stages NAME`, see `--list`). "
          "Do not edit this file by hand." % (s.name, r.ctx.out_dir.as_posix()), "",
          FEATURES_NOTE.format(accuracy=load_feature_extractor().metadata.get("test_accuracy", "unknown")), "")


def _footer(r: Report) -> None:
    r.add("## Where and how long", "")
    rows = [[name, rec["finished"], rec["seconds"], rec["machine"]["torch_threads"], rec["machine"]["cpu"]]
            for name, rec in r.records.items()]
    r.table(["stage", "finished", "seconds", "torch threads", "CPU"], rows)
    r.add("Seconds are wall-clock time of each stage on the machine named, where other stages may have run "
          "alongside; the speed stage (section 6) is meaningful only when run alone.", "")


def write_report(ctx: Context, stages: Sequence[Stage], path: "str | Path") -> Path:
    """Write the markdown report to ``path`` (figures under ``ctx.figures``); sections whose stages have no
    stored result say so. Returns the path."""
    path = Path(path)
    r = Report(ctx, stages, path)
    _header(r)
    for section in (_ddim_table1, _ancestral_vs_ddim, _inversion, _small_models, _dps, _speed,
                    lambda report: sampler_section(report, 7), _claims, _footer):
        section(r)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "\n".join(r.lines).rstrip() + "\n")
    return path
