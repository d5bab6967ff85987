"""Write a converted model: what ``diffcore convert`` runs. The source is read completely first, the target is
written atomically, and an existing target is refused, so a failure leaves nothing behind."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Mapping, Optional

import torch

from .. import checkpoint as ck
from .loading import load_model, model_kind
from .state import ConversionError

__all__ = ["convert_model", "SourceKind", "TargetKind"]

SourceKind = Literal["adm", "diffusers", "diffcore"]
TargetKind = Literal["diffcore", "diffusers"]


def convert_model(src: "str | os.PathLike", dst: "str | os.PathLike", *, source: Optional[SourceKind] = None,
                  target: TargetKind = "diffcore", preset: Optional[str] = None,
                  config: Optional[Mapping[str, Any]] = None, use_ema: bool = True) -> Path:
    """Convert the model at ``src`` and write it to ``dst``; returns ``dst``.

    Args:
        src: an ADM ``.pt`` file, a diffusers folder or a diffcore checkpoint (see :func:`load_model`).
        dst: a new folder: a diffcore checkpoint (``target="diffcore"``; loadable by ``load_trained_model`` and
            every ``--model``) or a diffusers ``DDPMPipeline`` folder (``target="diffusers"``).
        source: the expected kind of ``src`` (checked against what it is); None detects it.
        preset, config: the ADM preset name or flags (ADM sources only).
        use_ema: diffcore sources: export the EMA weights when present.

    Raises FileExistsError when ``dst`` exists, :class:`ConversionError` for unreadable / mismatched sources and
    for models the target cannot represent exactly (e.g. a diffusers schedule with given betas has no diffcore
    checkpoint form: use the diffusers folder directly as ``--model``).
    """
    src, dst = Path(src), Path(dst)
    if target not in ("diffcore", "diffusers"):
        raise ConversionError(f"target: expected 'diffcore' or 'diffusers', got {target!r}")
    if dst.exists() or dst.is_symlink():
        raise FileExistsError(f"{dst}: already exists; diffcore convert does not overwrite (choose a new folder)")
    kind = model_kind(src)
    if source is not None and source != kind:
        raise ConversionError(f"{src}: --from {source} given, but it is a {kind} model")
    if kind != "adm" and (preset is not None or config is not None):
        raise ConversionError(f"{src}: a preset / ADM config applies to ADM .pt files only, this is a {kind} model")
    loaded = load_model(src, use_ema=use_ema, preset=preset, config=config)
    if target == "diffusers":
        from .diffusers import save_diffusers_folder

        return save_diffusers_folder(dst, loaded.model, loaded.diffusion)
    from ..train.trainer import build_diffusion

    rebuilt = build_diffusion(loaded.config)
    same = (rebuilt.prediction_type == loaded.diffusion.prediction_type
            and rebuilt.variance_type == loaded.diffusion.variance_type
            and rebuilt.num_timesteps == loaded.diffusion.num_timesteps
            and torch.allclose(rebuilt.alphas_cumprod, loaded.diffusion.alphas_cumprod.cpu(), rtol=1e-12, atol=0))
    if not same:
        raise ConversionError(f"{src}: its process ({loaded.diffusion!r}) has no diffcore checkpoint form (a "
                              f"TrainConfig names the schedule); use the folder itself as --model, or convert "
                              f"--to diffusers")
    state = {"converted_from": str(src), "source": kind}
    return ck.save_checkpoint(dst, model=loaded.model.state_dict(), config=loaded.config.to_dict(), step=0,
                              state=state)
