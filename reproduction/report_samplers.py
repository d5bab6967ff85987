"""The report's section on every named sampler at equal cost (stage ``sampler-table``): a table of FID against
model evaluations, a plot, sample grids and the check of diffcore's default sampler for learned-variance models."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from reproduction.claims import Claim, fmt, lower
from reproduction.plots import line_plot

if TYPE_CHECKING:
    from reproduction.report import Report

#: the sampler that ``diffcore.sample(fast=True)`` and ``diffcore sample`` use for a learned variance
LEARNED_VARIANCE_DEFAULT = "ancestral"


def best_at(runs: list[dict], evaluations: int) -> Optional[dict]:
    """The run with the lowest FID among those at ``evaluations`` target model evaluations (None if none)."""
    cells = [run for run in runs if run["target_evaluations"] == evaluations]
    return min(cells, key=lambda run: run["fid"]) if cells else None


def sampler_section(r: "Report", number: int) -> None:
    """Section ``number``: FID of every sampler at each count of model evaluations, and the default's claim."""
    s = r.ctx.settings
    r.add(f"## {number}. Every sampler at equal model evaluations (packaged model)", "")
    data = r.result("sampler-table")
    if data is None:
        return r.missing("the sampler table", "sampler-table")
    runs, n = data["runs"], s.sampler_samples
    budgets = sorted({run["target_evaluations"] for run in runs})
    names = list(dict.fromkeys(run["sampler"] for run in runs))
    cell = {(run["sampler"], run["target_evaluations"]): run for run in runs}
    tol = 2.0 * data["spread"]["std"]
    m = data["description"]
    spacing_note = (", every budget here divides T" if all(m["num_timesteps"] % b == 0 for b in budgets) else
                    "; where S does not divide T, DDIM (in `diffcore.sample`) falls back to even spacing and Euler "
                    "takes one step more: see the counted calls below")
    r.add(f"Each sampler of `diffcore.samplers` (`diffcore.sample(sampler=...)`) on the packaged model "
          f"({m['variance_type']} variance, {m['schedule']} schedule, T = {m['num_timesteps']}) at "
          f"{', '.join(map(str, budgets))} model evaluations (NFE) per image, {n} samples per cell from the same "
          f"x_T as sections 1-2 (seed {s.seed} + k for batch k of {s.batch_size}), each with its defaults: "
          f"`clip_denoised=False` (the default of every sampler), its default spacing (DDIM and Euler: uniform "
          f"range(0, T, T/S){spacing_note}; ancestral: even, first step T - 1; DPM-Solver++ and Heun: "
          f"quadratic over [0, T)), eta 0 for DDIM and 1 for DPM-Solver++(2M) SDE. NFE counts model calls: every "
          f"sampler but Heun calls the model once per step; Heun twice (once on its last step), so S steps cost "
          f"2 S - 1 calls and the budget N buys S = floor((N + 1) / 2) steps, i.e. "
          + ", ".join(f"{cell[('heun', k)]['evaluations']:g}" for k in budgets if ('heun', k) in cell)
          + " calls. The calls were counted during sampling. Floor (real vs real, n = "
          f"{n}): FID {fmt(data['floor']['fid'])}; disjoint real sets of {n} scatter by sigma = "
          f"{fmt(data['spread']['std'])}, so differences below {fmt(tol)} are ties.", "")
    rows = []
    for name in names:
        first = next(run for run in runs if run["sampler"] == name)
        top = cell.get((name, max(budgets)))
        rows.append([f"`{name}`", first["order"], first["calls_per_step"], first["schedule"]]
                    + [fmt(cell[(name, k)]["fid"]) if (name, k) in cell else "-" for k in budgets]
                    + [f"{top['images_per_s']:.2f}" if top else "-"])
    rows.append(["real floor", "", "", ""] + [fmt(data["floor"]["fid"])] * len(budgets) + [""])
    r.table(["sampler", "order", "model calls per step", "spacing", *[f"FID at {k} NFE" for k in budgets],
             f"images/s at {max(budgets)} NFE"], rows)
    k = max(budgets)
    _first_step_note(r, runs, m["num_timesteps"])
    clipped = clipped_fids(r)
    if clipped:
        r.add("With x0_hat clipped to [-1, 1] at every step (the default of `diffcore.sample` and `diffcore "
              "sample`; sections 1-2, same x_T, same count): " + "; ".join(
                  f"{name} " + ", ".join(f"{fmt(v)} at {s_}" for s_, v in sorted(values.items()) if s_ in budgets)
                  for name, values in clipped.items()) + " (steps = NFE). This stage has not measured the other "
              "samplers with clipping.", "")
    line_plot(r.ctx.figures / "samplers_fid_nfe.png",
              [(name, [b for b in budgets if (name, b) in cell], [cell[(name, b)]["fid"] for b in budgets
                                                                  if (name, b) in cell], "o-") for name in names],
              xlabel="model evaluations per image (NFE)", ylabel="FID (classifier features)",
              title="Samplers at equal cost (packaged model)", logx=True, logy=True,
              hlines=[("real floor", data["floor"]["fid"])])
    r.figure("samplers_fid_nfe.png", "FID against model evaluations for every sampler")
    r.add("<details><summary>Every cell: steps, counted model calls, first timestep, KID, precision, recall, "
          "time</summary>", "")
    r.table(["sampler", "NFE budget", "steps", "model calls counted", "first t", "FID", "KID", "precision",
             "recall", "seconds", "images/s"],
            [[run["sampler"], run["target_evaluations"], run["steps"], f"{run['evaluations']:g}", run["first_t"],
              fmt(run["fid"]), fmt(run["kid"]), fmt(run["precision"]), fmt(run["recall"]), run["seconds"],
              f"{run['images_per_s']:.2f}"] for run in runs])
    r.add("</details>", "", f"<details><summary>Samples at {k} NFE (first 16, same x_T), in the table's order: "
          + ", ".join(names) + "</summary>", "")
    for name in names:
        r.grid(f"sampler_{name}_nfe{k}.png", f"{name}, {k} NFE")
    r.add("</details>", "")
    _default_claim(r, cell, k, tol)


def clipped_fids(r: "Report") -> dict[str, dict[int, float]]:
    """FID by steps of ancestral sampling and DDIM (eta 0) with x0_hat clipped, from sections 1-2's stages."""
    anc, table1 = r.result("packaged-samplers"), r.result("ddim-table1")
    out: dict[str, dict[int, float]] = {}
    if anc:
        out["ancestral"] = {run["steps"]: run["fid"] for run in anc["runs"] if run["sampler"] == "ddpm"}
    if table1:
        out["ddim"] = {run["steps"]: run["fid"] for run in table1["runs"] if run["eta"] == 0.0}
    return out


def _first_step_note(r: "Report", runs: list[dict], T: int) -> None:
    """Why the samplers whose first step is t = T - 1 fail without clipping (when they do)."""
    top = [run for run in runs if run["first_t"] == T - 1]
    later = [run for run in runs if run["first_t"] != T - 1]
    if not top or not later or min(run["fid"] for run in top) <= max(run["fid"] for run in later):
        return
    abar = float(r.ctx.packaged_model().diffusion.alphas_cumprod.double()[T - 1])
    r.add(f"Without clipping, every cell whose first step is t = T - 1 = {T - 1} scores FID "
          f"{fmt(min(run['fid'] for run in top))} or worse ({', '.join(sorted({run['sampler'] for run in top}))}), "
          f"every cell that starts later (uniform spacing, t = T - T/S) {fmt(max(run['fid'] for run in later))} or "
          f"better. At t = T - 1 the cosine schedule (betas clipped at 0.999) has abar = {abar:.1e}, and x0_hat = "
          f"(x_t - sqrt(1 - abar) eps_hat) / sqrt(abar) multiplies the model's eps error by 1 / sqrt(abar) = "
          f"{abar ** -0.5:.0e}; unclipped, that x0_hat enters the first step's update. Clipping x0_hat (or "
          f"starting at T - T/S) removes it.", "")


def _default_claim(r: "Report", cell: dict, k: int, tol: float) -> None:
    """diffcore's default for learned-variance models should be the best sampler at ``k`` model evaluations."""
    default = cell.get((LEARNED_VARIANCE_DEFAULT, k))
    others = [run for (name, nfe), run in cell.items() if nfe == k and name != LEARNED_VARIANCE_DEFAULT]
    if default is None or not others:
        return
    rival = min(others, key=lambda run: run["fid"])
    agrees = lower(default["fid"], rival["fid"], tol)
    explanation = None
    if agrees is False:
        explanation = (f"Without clipping `{rival['sampler']}` scores {fmt(rival['fid'])} at {k} NFE against "
                       f"ancestral sampling's {fmt(default['fid'])}, beyond the noise ({fmt(tol)}); see section 7 "
                       f"for why the samplers that start at t = T - 1 fail unclipped.")
        clipped = clipped_fids(r)
        if k in clipped.get("ancestral", {}):
            explanation += (f" With clipping, the default of `diffcore.sample` / `diffcore sample`, ancestral "
                            f"sampling scores {fmt(clipped['ancestral'][k])} at {k} steps (section 2), better than "
                            f"every unclipped cell here; the clipped comparison of all samplers is not measured.")
    r.claims.append(Claim("sampler-default",
                          f"without x0 clipping (every sampler function's default), respaced ancestral sampling with "
                          f"the learned variance (diffcore's default sampler for such models) gives the best FID "
                          f"of all samplers at {k} model evaluations",
                          f"ancestral {fmt(default['fid'])}; best other: {rival['sampler']} {fmt(rival['fid'])}",
                          agrees, explanation))
