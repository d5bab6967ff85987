"""Fuzzed op calls: every case either raises a clear error naming the bad argument, or fused == reference.

A seeded generator makes a few hundred cases (random shapes including 0-size ones, layouts, dtypes, devices,
NaN/inf inputs, timesteps at and beyond the table's ends, bad enums, seeds, offsets and eta) for the four ops,
called through the ``diffcore.ops`` wrappers and through ``torch.ops.diffcore`` directly (and, for the direct
calls, again under FakeTensorMode). The cases run in a few worker subprocesses, so that a crash is reported as
the case that crashed instead of killing the test session. For each case:

- a corrupted argument: the fused path, the reference path (wrapper calls) and the fake path (direct calls,
  except for timestep values, which a fake tensor does not have) each raise ValueError, TypeError or
  RuntimeError whose message names the argument (``"t: ..."``, or the dispatcher's ``argument 't'``);
- valid input: fused and reference outputs agree within the dtype's tolerance, NaN positions included
  (``assert_close(equal_nan=True)``); meta-device calls agree in shape, dtype and device; the fake op's output
  has the real op's shape, dtype, strides and device.

Run ``python tests/test_op_fuzz.py CASES.json`` to replay cases by hand (the worker's entry point).
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

NUM_CASES = 320
SEED = 12
WORKERS = 2  # subprocesses, run one after another (each pays the ~3 s import)
OPS = ["q_sample", "ddim_step", "ddpm_step", "hybrid_loss"]
SHAPES = [(3, 2, 4, 5), (1, 3, 2, 2), (0, 2, 3, 3), (2, 3, 0, 4), (4, 5), (2, 1, 3, 2, 2), (5, 1), (3, 4, 1, 1),
          (2, 3, 6, 6), (6, 2, 5, 3)]
LAYOUTS = ["contiguous", "channels_last", "strided", "expanded"]
DTYPES = ["float32", "float64", "bfloat16", "float16"]
# image-like arguments of each op (the first one sets the shape, dtype and device the others must match)
IMAGES = {"q_sample": ["x0", "noise"], "ddim_step": ["x", "model_output", "noise"],
          "ddpm_step": ["x", "model_output", "noise"], "hybrid_loss": ["x0", "model_output", "x_t", "noise"]}
VALUE_CORRUPTIONS = {"t_high", "t_negative", "t_prev_high"}  # found by reading values: not by fake tensors


# ---------------------------------------------------------------- the cases (parent side)


def _corruptions(op: str, route: str, noise_given: bool) -> list[tuple[str, str]]:
    first = IMAGES[op][0]
    out = [("t", "high"), ("t", "negative"), ("t", "int32"), ("t", "shape"), ("t", "meta"),
           ("alphas_cumprod", "float32"), ("alphas_cumprod", "2d"), ("alphas_cumprod", "meta"),
           (first, "int64"), (first, "0d")]
    out += [(name, how) for name in IMAGES[op][1:] for how in ("shape", "dtype", "meta")
            if name != "noise" or op in ("q_sample", "hybrid_loss") or noise_given]
    if op in ("ddim_step", "ddpm_step", "hybrid_loss"):
        out += [("prediction_type", "7"), ("prediction_type", "-1")]
    if op in ("ddpm_step", "hybrid_loss"):
        out += [("variance_type", "9"), ("alphas_cumprod", "short")]
    if op == "hybrid_loss":
        out += [("variance_type", "fixed")]
    if op == "ddpm_step":
        out += [("model_output", "channels")]
    if op == "ddim_step":
        out += [("t_prev", "high"), ("t_prev", "float"), ("eta", "negative"), ("eta", "nan")]
    if op in ("ddim_step", "ddpm_step"):
        if not noise_given:
            out += [("seed", "-1"), ("offset", "-1")]
        if route == "wrapper":
            out += [("offset", "2**63"), ("seed", "2**63"), ("seed", "str"), ("offset", "str"),
                    ("clip_denoised", "str")]
            if op == "ddim_step":
                out += [("eta", "str"), ("eta", "inf")]
            out += [("prediction_type", "str")]
    return out


def make_cases(num_cases: int = NUM_CASES, seed: int = SEED) -> list[dict]:
    rng = random.Random(seed)
    cases = []
    for index in range(num_cases):
        op = OPS[index % len(OPS)]
        route = rng.choice(["wrapper", "direct"])
        shape = list(rng.choice(SHAPES))
        case = {
            "id": index, "op": op, "route": route, "shape": shape, "dtype": rng.choice(DTYPES),
            "layout": rng.choice(LAYOUTS), "device": "cpu", "T": rng.choice([2, 3, 10, 40]),
            "prediction_type": rng.randrange(3), "variance_type": rng.choice([2, 3]) if op == "hybrid_loss"
            else rng.randrange(4), "clip": rng.random() < 0.5, "eta": rng.choice([0.0, 0.3, 1.0, 2.5]),
            "noise_given": rng.random() < 0.5, "seed": rng.choice([0, 7, 2**32 + 5, 2**63 - 1]),
            "offset": rng.choice([0, 3, 2**32 - 1, 2**63 - 1]), "t_prev": rng.choice(["below", "random", "min"]),
            "check_values": rng.random() < 0.7, "nonfinite": None, "bad": None,
        }
        if op == "q_sample":
            case["noise_given"] = True
        if op == "ddim_step" and route == "direct" and rng.random() < 0.1:
            case["eta"] = float("inf")  # valid for the op itself (the wrapper rejects it)
        roll = rng.random()
        if roll < 0.5:
            case["bad"] = list(rng.choice(_corruptions(op, route, case["noise_given"])))
        elif roll < 0.75:
            target = rng.choice([n for n in IMAGES[op] if n != "noise" or case["noise_given"]])
            case["nonfinite"] = [target, rng.choice(["nan", "inf", "-inf"])]
        elif roll < 0.82 and route == "direct":
            case["device"] = "meta"
        cases.append(case)
    return cases


def _describe(case: dict) -> str:
    keys = ["op", "route", "device", "dtype", "shape", "layout", "T", "prediction_type", "variance_type", "clip",
            "eta", "noise_given", "nonfinite", "bad"]
    return ", ".join(f"{k}={case[k]}" for k in keys)


def run_cases(cases: list[dict]) -> dict[int, dict]:
    """Run cases in worker subprocesses; a worker that dies marks its current case as crashed and a new one goes
    on with the rest."""
    results: dict[int, dict] = {}
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    chunk = -(-len(cases) // WORKERS)
    pending = [cases[i:i + chunk] for i in range(0, len(cases), chunk)]
    with tempfile.TemporaryDirectory() as folder:
        while pending:
            batch = pending.pop(0)
            path = Path(folder) / "cases.json"
            path.write_text(json.dumps(batch))
            proc = subprocess.run([sys.executable, __file__, str(path)], capture_output=True, text=True, env=env,
                                  timeout=300)
            started = None
            for line in proc.stdout.splitlines():
                if line.startswith("START "):
                    started = int(line.split()[1])
                elif line.startswith("RESULT "):
                    result = json.loads(line[len("RESULT "):])
                    results[result["id"]] = result
                    started = None
            if proc.returncode != 0 or started is not None:
                if started is None:
                    raise RuntimeError(f"fuzz worker failed outside a case: {proc.stderr[-2000:]}")
                results[started] = {"id": started, "ok": False,
                                    "why": f"crashed (exit {proc.returncode}): {proc.stderr[-500:]}"}
                rest = [c for c in batch if c["id"] not in results]
                if rest:
                    pending.insert(0, rest)
    return results


@pytest.mark.slow
def test_fuzzed_op_calls():
    cases = make_cases()
    results = run_cases(cases)
    assert len(results) == len(cases)
    failures = [(case, results[case["id"]]) for case in cases if not results[case["id"]]["ok"]]
    report = "\n".join(f"case {case['id']} ({_describe(case)}): {result['why']}" for case, result in failures[:40])
    if failures:
        pytest.fail(f"{len(failures)} of {len(cases)} fuzzed op calls failed:\n{report}", pytrace=False)


def test_cases_cover_the_space():
    """The generator reaches every op, route, dtype, layout, corruption kind and NaN/inf on each input."""
    cases = make_cases()
    assert {c["op"] for c in cases} == set(OPS) and {c["dtype"] for c in cases} == set(DTYPES)
    assert {c["layout"] for c in cases} == set(LAYOUTS) and {c["device"] for c in cases} == {"cpu", "meta"}
    assert sum(c["bad"] is None for c in cases) > 100 and sum(c["bad"] is not None for c in cases) > 100
    assert sum(c["nonfinite"] is not None for c in cases) > 50
    assert any(c["shape"][0] == 0 for c in cases) and any(0 in c["shape"][1:] for c in cases)


# ---------------------------------------------------------------- the worker (subprocess side)


def _tolerance(dtype):
    from op_cases import tolerance

    return tolerance(torch.float64 if dtype == torch.float64 else dtype)


def _layout(tensor, kind):
    from op_cases import layout

    if kind == "expanded":  # stride 0 along the last dimension
        return tensor if tensor.numel() == 0 else tensor[..., :1].expand(tensor.shape)
    if kind == "channels_last" and tensor.dim() != 4:
        kind = "contiguous"
    return layout(tensor, kind)


def _table(num_timesteps: int) -> torch.Tensor:
    """A valid alphas_cumprod (decreasing, in (0, 1)) for any length: betas from 0.01 to 0.5."""
    return torch.cumprod(1.0 - torch.linspace(0.01, 0.5, num_timesteps, dtype=torch.float64), 0)


class Inputs:
    """The schema arguments of one case, as the op and the wrapper take them."""

    def __init__(self, case: dict):
        self.case, self.op = case, case["op"]
        g = torch.Generator().manual_seed(1000 + case["id"])
        dtype = getattr(torch, case["dtype"])
        shape = tuple(case["shape"])
        batch, T = shape[0], case["T"]
        learned = case["variance_type"] in (2, 3)

        def image(shp, scale=1.0, shift=0.0, clamp=None):
            v = scale * torch.randn(*shp, generator=g, dtype=torch.float64) + shift
            return v.clamp(-clamp, clamp) if clamp else v

        x = image(shape, clamp=1.0 if self.op == "hybrid_loss" else None)
        pred = image(shape, 0.5)
        if learned and self.op in ("ddpm_step", "hybrid_loss"):
            var = image(shape, 0.5, clamp=1.0) if case["variance_type"] == 2 else image(shape, 1.0, -4.0)
            model_output = torch.cat([pred, var], 1)
        else:
            model_output = pred
        t = torch.randint(0, T, (batch,), generator=g)
        if case["t_prev"] == "below":
            t_prev = t - 1
        elif case["t_prev"] == "random":
            t_prev = torch.randint(-3, T, (batch,), generator=g)
        else:
            t_prev = torch.full((batch,), -2**63)
        images = {"x": x, "x0": x, "model_output": model_output, "noise": image(shape), "x_t": image(shape)}
        if case["nonfinite"]:
            target, kind = case["nonfinite"]
            flat = images[target].view(-1)
            if flat.numel():
                where = torch.randint(0, flat.numel(), (max(1, flat.numel() // 7),), generator=g)
                flat[where] = float(kind)
        images = {k: _layout(v.to(dtype), case["layout"]) for k, v in images.items()}
        self.args = {
            "x": images["x"], "x0": images["x0"], "model_output": images["model_output"], "x_t": images["x_t"],
            "noise": images["noise"] if case["noise_given"] else None, "t": t, "t_prev": t_prev,
            "alphas_cumprod": _table(T), "eta": case["eta"], "prediction_type": case["prediction_type"],
            "variance_type": case["variance_type"], "clip_denoised": case["clip"], "seed": case["seed"],
            "offset": case["offset"],
        }
        if self.op == "hybrid_loss":
            self.args["noise"] = images["noise"]
        if case["device"] == "meta":
            self.args = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in self.args.items()}
        if case["bad"]:
            self._corrupt(*case["bad"], T)

    def _corrupt(self, name: str, how: str, T: int) -> None:
        a = self.args
        value = a[name]
        if name == "eta" and how != "str":
            value = {"negative": -0.5, "nan": float("nan"), "inf": float("inf")}[how]
        elif how == "high":
            value = value.clone()
            if value.numel():
                value[0] = T + 3
            else:  # nothing to be out of range in an empty batch: make the batch non-empty
                self._one_sample()
                value = a[name].clone()
                value[0] = T + 3
        elif how == "negative":
            if a["t"].numel() == 0:
                self._one_sample()
            value = a[name].clone()
            value[-1] = -1 if self.case["id"] % 2 else -2**63
        elif how == "int32":
            value = value.int()
        elif how == "float":
            value = value.double()
        elif how == "shape" and name in ("t", "t_prev"):
            value = torch.cat([value, value.new_zeros(1)])
        elif how == "shape":
            value = torch.zeros(*value.shape[:-1], value.shape[-1] + 1, dtype=value.dtype)
        elif how == "meta":
            value = value.to("meta")
        elif how == "float32":
            value = value.float()
        elif how == "2d":
            value = value[None]
        elif how == "short":
            value = value[:1]
        elif how == "int64":
            value = value.long()
        elif how == "0d":
            value = value.flatten()[0].clone() if value.numel() else value.new_tensor(0.5)
        elif how == "dtype":
            value = value.to(torch.float64 if value.dtype != torch.float64 else torch.float32)
        elif how == "channels":
            value = value[:, : max(1, value.shape[1] // 2)] if a["variance_type"] in (2, 3) else \
                torch.cat([value, value], 1)
        elif how == "str":
            value = {"eta": "0.5", "seed": "12", "offset": "3", "clip_denoised": "no",
                     "prediction_type": "score"}[name]
        elif how == "fixed":
            value = 0
        else:  # an integer given as text: "7", "-1", "2**63", "9"
            value = eval(how)  # noqa: S307 - the generator's own constants
        a[name] = value

    def _one_sample(self) -> None:
        """Grow an empty batch to one sample (for value corruptions, which need a timestep to corrupt)."""
        for key, value in self.args.items():
            if isinstance(value, torch.Tensor) and key != "alphas_cumprod" and value.shape[0] == 0:
                self.args[key] = torch.zeros((1, *value.shape[1:]), dtype=value.dtype, device=value.device)

    def schema(self) -> list:
        a = self.args
        return {
            "q_sample": lambda: [a["x0"], a["noise"], a["t"], a["alphas_cumprod"]],
            "ddim_step": lambda: [a["x"], a["model_output"], a["t"], a["t_prev"], a["alphas_cumprod"], a["eta"],
                                  a["prediction_type"], a["clip_denoised"], a["noise"], a["seed"], a["offset"]],
            "ddpm_step": lambda: [a["x"], a["model_output"], a["t"], a["alphas_cumprod"], a["prediction_type"],
                                  a["variance_type"], a["clip_denoised"], a["noise"], a["seed"], a["offset"]],
            "hybrid_loss": lambda: [a["model_output"], a["x0"], a["x_t"], a["noise"], a["t"], a["alphas_cumprod"],
                                    a["prediction_type"], a["variance_type"]],
        }[self.op]()

    def wrapper(self, impl: str):
        from diffcore import ops

        a, cv = self.args, self.case["check_values"]
        if self.op == "q_sample":
            return ops.q_sample(a["x0"], a["noise"], a["t"], a["alphas_cumprod"], impl=impl, check_values=cv)
        if self.op == "ddim_step":
            return ops.ddim_step(a["x"], a["model_output"], a["t"], a["t_prev"], a["alphas_cumprod"], a["eta"],
                                 prediction_type=a["prediction_type"], clip_denoised=a["clip_denoised"],
                                 noise=a["noise"], seed=a["seed"], offset=a["offset"], impl=impl, check_values=cv)
        if self.op == "ddpm_step":
            return ops.ddpm_step(a["x"], a["model_output"], a["t"], a["alphas_cumprod"],
                                 prediction_type=a["prediction_type"], variance_type=a["variance_type"],
                                 clip_denoised=a["clip_denoised"], noise=a["noise"], seed=a["seed"],
                                 offset=a["offset"], impl=impl, check_values=cv)
        return ops.hybrid_loss(a["model_output"], a["x0"], a["x_t"], a["noise"], a["t"], a["alphas_cumprod"],
                               prediction_type=a["prediction_type"], variance_type=a["variance_type"], impl=impl,
                               check_values=cv)


def _call(fn):
    try:
        out = fn()
    except Exception as error:  # noqa: BLE001 - the kind is asserted by the caller
        return None, error
    return (out if isinstance(out, tuple) else (out,)), None


def _names(error: BaseException, name: str) -> bool:
    text = str(error)
    return isinstance(error, (ValueError, TypeError, RuntimeError)) and (
        text.startswith(f"{name}:") or f"\n{name}:" in text or f" {name}:" in text or f"argument '{name}'" in text)


def _expect_error(label: str, error, name: str) -> str:
    if error is None:
        return f"{label}: no error for bad {name}"
    if not _names(error, name):
        return f"{label}: {type(error).__name__} does not name {name}: {str(error)[:300]}"
    return ""


def _compare(label: str, got, want, dtype) -> str:
    if len(got) != len(want):
        return f"{label}: {len(got)} outputs, expected {len(want)}"
    for k, (a, b) in enumerate(zip(got, want)):
        if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
            return f"{label}: output {k} is {a.dtype} {tuple(a.shape)} on {a.device}, reference " \
                   f"{b.dtype} {tuple(b.shape)} on {b.device}"
        if a.device.type == "meta":
            continue
        try:
            torch.testing.assert_close(a.double(), b.double(), equal_nan=True, **_tolerance(dtype))
        except AssertionError as mismatch:
            return f"{label}: output {k} differs from the reference: {str(mismatch)[:400]}"
    return ""


def _same_metadata(label: str, fake, real) -> str:
    for k, (a, b) in enumerate(zip(fake, real)):
        if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device or \
                (a.numel() > 1 and a.stride() != b.stride()):
            return f"{label}: fake output {k} is {a.dtype} {tuple(a.shape)} {a.stride()} on {a.device}, real one " \
                   f"{b.dtype} {tuple(b.shape)} {b.stride()} on {b.device}"
    return ""


def check_case(case: dict) -> str:
    """'' when the case behaves as it must, else what went wrong."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from diffcore import reference

    inputs = Inputs(case)
    dtype = getattr(torch, case["dtype"])
    bad = case["bad"]
    if case["route"] == "wrapper":
        fused, fused_error = _call(lambda: inputs.wrapper("fused"))
        ref, ref_error = _call(lambda: inputs.wrapper("reference"))
        if bad:
            return _expect_error("wrapper fused", fused_error, bad[0]) or \
                _expect_error("wrapper reference", ref_error, bad[0])
        if fused_error or ref_error:
            return f"valid input raised: fused {fused_error!r}, reference {ref_error!r}"
        return _compare("wrapper", fused, ref, dtype)

    op = getattr(torch.ops.diffcore, case["op"])
    args = inputs.schema()
    real, real_error = _call(lambda: op(*args))
    problem = ""
    if bad:
        problem = _expect_error("torch.ops", real_error, bad[0])
    elif real_error:
        return f"valid input raised: {real_error!r}"
    else:
        ref, ref_error = _call(lambda: getattr(reference, case["op"])(*args))
        if ref_error:
            return f"reference raised on valid input: {ref_error!r}"
        problem = _compare("torch.ops", real, ref, dtype)
    if problem or case["device"] == "meta" or (bad and "_".join(bad) in VALUE_CORRUPTIONS):
        return problem
    mode = FakeTensorMode()
    fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
    with mode:
        fake, fake_error = _call(lambda: op(*fake_args))
    if bad:
        if isinstance(real_error, RuntimeError) and not isinstance(fake_error, RuntimeError):
            return f"fake: {fake_error!r} where the real op raised RuntimeError"
        return _expect_error("fake", fake_error, bad[0])
    if fake_error:
        return f"fake: valid input raised {fake_error!r}"
    return _same_metadata("fake", fake, real)


def worker(path: str) -> None:
    import warnings

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    for case in json.loads(Path(path).read_text()):
        print(f"START {case['id']}", flush=True)
        if os.environ.get("DIFFCORE_FUZZ_CRASH_AT") == str(case["id"]):  # to check the crash handling by hand
            os.abort()
        try:
            why = check_case(case)
        except Exception as error:  # noqa: BLE001 - reported as the case's failure
            why = f"the test harness raised {error!r}"
        print("RESULT " + json.dumps({"id": case["id"], "ok": not why, "why": why}), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    worker(sys.argv[1])
