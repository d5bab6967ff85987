"""The report's section on every named sampler at equal cost (stage ``sampler-table``): a table of FID against
model evaluations, a plot, sample grids and the check of diffcore's default sampler for learned-variance models."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from reproduction.claims import Claim, fmt, lower
from reproduction.plots import line_plot
from reproduction.sampler_table import grid_name

if TYPE_CHECKING:
    from reproduction.report import Report

#: the sampler that ``diffcore.sample(fast=True)`` and ``diffcore sample`` use for a learned variance
LEARNED_VARIANCE_DEFAULT = "ancestral"


def best_at(runs: list[dict], evaluations: int) -> Optional[dict]:
    """The run with the lowest FID among those at ``evaluations`` target model evaluations (None if none)."""
    cells = [run for run in runs if run["target_evaluations"] == evaluations]
    return min(cells, key=lambda run: run["fid"]) if cells else None


def sampler_section(r: "Report", number: int) -> None:
    """Section ``number``: FID of every sampler at each count of model evaluations, without and with x0 clipping,
    and the default's claim."""
    s = r.ctx.settings
    r.add(f"## {number}. Every sampler at equal model evaluations (packaged model)", "")
    plain, clipped = r.result("sampler-table"), merged_clipped_table(r)
    if plain is None and clipped is None:
        return r.missing("the sampler table", "sampler-table")
    data = clipped or plain
    tables = [(label, d) for label, d in (("no clipping", plain), ("clipped", clipped)) if d is not None]
    runs, n = data["runs"], s.sampler_samples
    budgets = sorted({run["target_evaluations"] for run in runs})
    names = list(dict.fromkeys(run["sampler"] for run in runs))
    cells = {label: {(run["sampler"], run["target_evaluations"]): run for run in d["runs"]} for label, d in tables}
    cell = cells.get("clipped") or next(iter(cells.values()))
    tol = 2.0 * data["spread"]["std"]
    m = data["description"]
    spacing_note = (", every budget here divides T" if all(m["num_timesteps"] % b == 0 for b in budgets) else
                    "; where S does not divide T, DDIM (in `diffcore.sample`) falls back to even spacing and Euler "
                    "takes one step more: see the counted calls below")
    spacings = "; ".join(f"{name}: {cell[(name, budgets[0])]['schedule']}" for name in names
                         if (name, budgets[0]) in cell)
    r.add(f"Each sampler of `diffcore.samplers` (`diffcore.sample(sampler=...)`) on the packaged model "
          f"({m['variance_type']} variance, {m['schedule']} schedule, T = {m['num_timesteps']}) at "
          f"{', '.join(map(str, budgets))} model evaluations (NFE) per image, {n} samples per cell from the same "
          f"x_T as sections 1-2 (seed {s.seed} + k for batch k of {s.batch_size}), each with its default spacing "
          f"({spacings}; uniform is range(0, T, T/S){spacing_note}; even starts at T - 1; karras is EDM's rho = 7 "
          f"from sigma = 80 down, see `diffcore.samplers.spacing`), eta 0 for DDIM and 1 for DPM-Solver++(2M) SDE; "
          f"once with `clip_denoised=False` (every sampler function's default; stage `sampler-table`) and once "
          f"with x0_hat clipped to [-1, 1] at every step (the default of `diffcore.sample` and `diffcore sample`; "
          f"stages `sampler-table-clipped-<sampler>`). NFE counts model calls: every sampler but Heun calls the "
          f"model once per step; Heun twice (once on its last step), so S steps cost 2 S - 1 calls and the budget N buys "
          f"S = floor((N + 1) / 2) steps. The calls were counted during sampling. Floor (real vs real, n = "
          f"{n}): FID {fmt(data['floor']['fid'])}; disjoint real sets of {n} scatter by sigma = "
          f"{fmt(data['spread']['std'])}, so differences below {fmt(tol)} are ties.", "")
    rows = []
    for name in names:
        first = next(run for run in runs if run["sampler"] == name)
        fids = [" / ".join(fmt(c[(name, k)]["fid"]) if (name, k) in c else "-" for k in budgets)
                + measured_with(c, name, first["schedule"]) for c in cells.values()]
        top = cell.get((name, max(budgets)))
        rows.append([f"`{name}`", first["order"], first["calls_per_step"], first["schedule"], *fids,
                     f"{top['images_per_s']:.2f}" if top else "-"])
    rows.append(["real floor", "", "", "", *[fmt(data["floor"]["fid"])] * len(tables), ""])
    k = max(budgets)
    r.table(["sampler", "order", "model calls per step", "spacing",
             *[f"FID at {' / '.join(map(str, budgets))} NFE, {label}" for label, _ in tables],
             f"images/s at {k} NFE"], rows)
    if plain is not None:
        _first_step_note(r, plain["runs"], m["num_timesteps"])
    if clipped is not None:
        _fewer_steps_note(r, cells["clipped"], budgets, tol)
    line_plot(r.ctx.figures / "samplers_fid_nfe.png",
              [(f"{name}{'' if label == 'clipped' else ' (no clip)'}", [b for b in budgets if (name, b) in c],
                [c[(name, b)]["fid"] for b in budgets if (name, b) in c], "o-" if label == "clipped" else "x:")
               for label, c in cells.items() for name in names],
              xlabel="model evaluations per image (NFE)", ylabel="FID (classifier features)",
              title="Samplers at equal cost (packaged model)", logx=True, logy=True,
              hlines=[("real floor", data["floor"]["fid"])])
    r.figure("samplers_fid_nfe.png", "FID against model evaluations for every sampler (solid: clipped)")
    for label, d in tables:
        clip = label == "clipped"
        r.add(f"<details><summary>Every cell, {label}: steps, counted model calls, first timestep, KID, precision, "
              "recall, time</summary>", "")
        r.table(["sampler", "NFE budget", "steps", "model calls counted", "first t", "FID", "KID", "precision",
                 "recall", "seconds", "images/s"],
                [[run["sampler"], run["target_evaluations"], run["steps"], f"{run['evaluations']:g}", run["first_t"],
                  fmt(run["fid"]), fmt(run["kid"]), fmt(run["precision"]), fmt(run["recall"]), run["seconds"],
                  f"{run['images_per_s']:.2f}"] for run in d["runs"]])
        r.add("</details>", "", f"<details><summary>Samples at {k} NFE, {label} (first 16, same x_T), in the "
              "table's order: " + ", ".join(names) + "</summary>", "")
        for name in names:
            r.grid(grid_name(name, k, clip), f"{name}, {k} NFE, {label}")
        r.add("</details>", "")
    _default_claim(r, cells.get("clipped"), k, tol)


def merged_clipped_table(r: "Report") -> Optional[dict]:
    """The clipped sampler table from its per-sampler stages (those run so far, in ``sampler_names`` order), or
    None when none has run."""
    from reproduction.stages import clipped_sampler_stage_name

    parts = [d for d in (r.result(clipped_sampler_stage_name(name)) for name in r.ctx.settings.sampler_names) if d]
    if not parts:
        return None
    return dict(parts[0], runs=[run for part in parts for run in part["runs"]])


def measured_with(cells: dict, name: str, schedule: str) -> str:
    """`` (spacing)`` when ``name``'s cells in ``cells`` were measured with another spacing than ``schedule`` (a
    stored table from before a default changed), else ``""``."""
    other = {run["schedule"] for (sampler, _), run in cells.items() if sampler == name} - {schedule}
    return f" ({', '.join(sorted(other))} spacing)" if other else ""


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


def _fewer_steps_note(r: "Report", cell: dict, budgets: list[int], tol: float) -> None:
    """Name the clipped samplers whose FID gets worse beyond the noise as the budget grows (when any does)."""
    lo, hi = min(budgets), max(budgets)
    worse = [name for (name, k) in cell if k == lo and (name, hi) in cell
             and cell[(name, hi)]["fid"] > cell[(name, lo)]["fid"] + tol]
    if not worse:
        return
    best = {name: min((cell[(name, k)] for k in budgets if (name, k) in cell), key=lambda run: run["fid"])
            for name in worse}
    r.add("With clipping, " + ", ".join(f"`{name}` ({fmt(cell[(name, lo)]['fid'])} at {lo} NFE, "
                                         f"{fmt(cell[(name, hi)]['fid'])} at {hi}; best {fmt(best[name]['fid'])} at "
                                         f"{best[name]['target_evaluations']})" for name in worse)
          + f" score{'s' if len(worse) == 1 else ''} worse with more model evaluations, beyond the noise "
          f"({fmt(tol)}). Deterministic solvers "
          "approach the probability-flow ODE's solution as steps grow, and this small model's ODE samples score "
          "worse than its coarse few-step ones (section 1: DDIM eta 0 also worsens towards S = 1000); the stochastic "
          "samplers keep improving with steps.", "")


def _default_claim(r: "Report", cell: Optional[dict], k: int, tol: float) -> None:
    """diffcore's default for learned-variance models should be the best sampler at ``k`` model evaluations with
    x0_hat clipped, as ``diffcore.sample`` and ``diffcore sample`` run it (a tie within the noise ``tol`` counts)."""
    if not cell:
        return
    default = cell.get((LEARNED_VARIANCE_DEFAULT, k))
    others = [run for (name, nfe), run in cell.items() if nfe == k and name != LEARNED_VARIANCE_DEFAULT]
    if default is None or not others:
        return
    rival = min(others, key=lambda run: run["fid"])
    agrees = lower(default["fid"], rival["fid"], tol)
    explanation = None
    if agrees is False:
        explanation = (f"`{rival['sampler']}` scores {fmt(rival['fid'])} at {k} NFE against ancestral sampling's "
                       f"{fmt(default['fid'])}, beyond the noise ({fmt(tol)}): the default should change.")
    r.claims.append(Claim("sampler-default",
                          f"with x0 clipped (the front door's default), respaced ancestral sampling with the learned "
                          f"variance (diffcore's default sampler for such models) gives the best FID of all samplers "
                          f"at {k} model evaluations, or ties the best",
                          f"ancestral {fmt(default['fid'])}; best other: {rival['sampler']} {fmt(rival['fid'])}",
                          agrees, explanation))
