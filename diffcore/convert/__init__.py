"""Models in and out: improved-diffusion / guided-diffusion / DPS (ADM) ``.pt`` state dicts and diffusers folders
enter as diffcore's own :class:`~diffcore.unet.UNet` and :class:`~diffcore.diffusion.GaussianDiffusion`, so every
sampler, DPS and the CLI serve them unchanged; a diffcore model leaves as a diffusers ``DDPMPipeline`` folder.

- :func:`from_adm_state_dict`, :func:`load_adm_model`, the presets (:data:`ADM_PRESETS`): :mod:`.adm`, :mod:`.presets`
- :func:`load_diffusers_folder`, :func:`save_diffusers_folder`, :func:`diffusion_from_diffusers_config`:
  :mod:`.diffusers`
- :func:`convert_adm_classifier`, :func:`from_adm_classifier_state_dict`, :data:`ADM_CLASSIFIER_PRESETS`:
  guided-diffusion's noisy classifiers, for classifier guidance (:mod:`.adm_classifier`)
- :func:`load_model`: any of them, or a diffcore checkpoint, as a :class:`~diffcore.train.load.TrainedModel`
- :func:`convert_model`: write a converted model (what ``diffcore convert`` runs): :mod:`.writing`

Loading never unpickles arbitrary objects (``.pt`` files are read with ``weights_only=True``, diffusers weights
only from safetensors).
"""
from .adm import ADMSpec, adm_spec, from_adm_state_dict, load_adm_model
from .adm_classifier import (ADM_CLASSIFIER_PRESETS, adm_classifier_preset_names, convert_adm_classifier,
                             from_adm_classifier_state_dict)
from .diffusers import (DiffusersModel, diffusion_from_diffusers_config, load_diffusers_folder,
                        save_diffusers_folder)
from .loading import load_model, model_kind
from .presets import ADM_PRESETS, ADMPreset, adm_preset, adm_preset_names
from .state import ConversionError, load_pt_state_dict
from .writing import convert_model

__all__ = ["ConversionError", "load_pt_state_dict", "ADMSpec", "adm_spec", "from_adm_state_dict", "load_adm_model",
           "ADM_PRESETS", "ADMPreset", "adm_preset", "adm_preset_names", "DiffusersModel", "load_diffusers_folder",
           "save_diffusers_folder", "diffusion_from_diffusers_config", "load_model", "model_kind",
           "ADM_CLASSIFIER_PRESETS", "adm_classifier_preset_names", "convert_adm_classifier",
           "from_adm_classifier_state_dict", "convert_model"]
