"""``diffcore convert SRC DST``: import improved-diffusion / guided-diffusion / DPS ``.pt`` checkpoints and diffusers
folders as diffcore checkpoints, or export a model as a diffusers ``DDPMPipeline`` folder
(see :mod:`diffcore.convert`)."""
from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

from .common import UsageError


def register(sub) -> None:
    """Add the ``convert`` subcommand to the subparsers ``sub``."""
    from ..convert.adm_classifier import adm_classifier_preset_names
    from ..convert.presets import adm_preset_names

    p = sub.add_parser("convert", help="import ADM (.pt) and diffusers models, export to diffusers",
                       description="Convert SRC (an improved-diffusion / guided-diffusion / DPS .pt state dict, a "
                       "diffusers UNet2DModel or DDPMPipeline folder, or a diffcore checkpoint) into DST, a new "
                       "folder: a diffcore checkpoint (--to diffcore, usable as --model everywhere) or a diffusers "
                       "DDPMPipeline folder (--to diffusers). DST must not exist; nothing is written on failure. "
                       ".pt files are read with weights_only loading (no arbitrary objects are unpickled).")
    p.add_argument("src", type=Path, help="the model to convert")
    p.add_argument("dst", type=Path, help="the folder to create")
    p.add_argument("--from", dest="source", choices=["adm", "adm-classifier", "diffusers", "diffcore"],
                   help="what SRC is (default: detected; checked when given); adm-classifier: a guided-diffusion "
                   "noisy classifier .pt, written as a checkpoint for `diffcore sample --classifier` (needs --preset "
                   "or --config)")
    p.add_argument("--to", dest="target", choices=["diffcore", "diffusers"], default="diffcore",
                   help="what to write (default diffcore)")
    p.add_argument("--preset", choices=adm_preset_names() + adm_classifier_preset_names(),
                   help="ADM sources: the published model SRC is (the *-classifier presets with --from adm-classifier)")
    p.add_argument("--config", help="ADM sources: the model's flags as JSON (a file or an inline object), e.g. "
                   "'{\"image_size\": 256, \"num_channels\": 128, \"num_res_blocks\": 1, ...}' with the names of "
                   "the ADM scripts; missing flags take guided-diffusion's defaults (add \"codebase\": "
                   "\"improved-diffusion\" for improved-diffusion's)")
    p.add_argument("--raw-weights", action="store_true", help="diffcore sources: the trained weights, not the EMA")
    p.set_defaults(run=run)


def _config(text):
    if text is None:
        return None
    path = Path(text)
    try:
        raw = path.read_text() if not text.lstrip().startswith("{") and path.is_file() else text
        data = json.loads(raw)
    except (OSError, json.JSONDecodeError) as error:
        raise UsageError(f"--config: expected a JSON object or a JSON file, got {text!r:.80} ({error})") from None
    if not isinstance(data, dict):
        raise UsageError(f"--config: expected a JSON object of ADM flags, got {type(data).__name__}")
    return data


def run(args: argparse.Namespace) -> int:
    """Convert, print what was written (and any warning, e.g. the added null-class row) and return 0."""
    from ..convert.writing import convert_model

    if args.dst.exists() or args.dst.is_symlink():
        raise UsageError(f"DST: {args.dst} already exists; diffcore convert does not overwrite (choose a new folder)")
    if args.preset is not None and args.config is not None:
        raise UsageError("--preset, --config: give one of them, not both")
    config = _config(args.config)
    if args.source == "adm-classifier":
        return _convert_classifier(args, config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = convert_model(args.src, args.dst, source=args.source, target=args.target, preset=args.preset,
                            config=config, use_ema=not args.raw_weights)
    for warning in caught:
        print(f"diffcore convert: note: {warning.message}")
    print(f"wrote {args.target} model {out}")
    return 0


def _convert_classifier(args: argparse.Namespace, config) -> int:
    """``--from adm-classifier``: a guided-diffusion classifier .pt -> a noisy-classifier checkpoint."""
    from ..convert.adm_classifier import adm_classifier_preset_names, convert_adm_classifier

    if args.target != "diffcore":
        raise UsageError("--to: an ADM classifier converts to a diffcore classifier checkpoint only (--to diffcore)")
    if args.preset is None and config is None:
        raise UsageError(f"--preset: --from adm-classifier needs --preset ({', '.join(adm_classifier_preset_names())}) "
                         f"or --config")
    if args.preset is not None and args.preset not in adm_classifier_preset_names():
        raise UsageError(f"--preset: expected a classifier preset ({', '.join(adm_classifier_preset_names())}) with "
                         f"--from adm-classifier, got {args.preset}")
    out = convert_adm_classifier(args.src, args.dst, preset=args.preset, config=config)
    print(f"wrote classifier {out} (use it with: diffcore sample --classifier {out} --class K)")
    return 0
