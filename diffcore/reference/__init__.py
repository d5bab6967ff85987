"""Pure-torch reference implementations of the fused ops (fallback and test oracle)."""
from . import autograd
from .attention import attention_qkv
from .group_norm import group_norm_act
from .ops import ddim_step, ddpm_step, hybrid_loss, hybrid_loss_backward, q_sample
from .philox import philox_normal, philox_normal_like

__all__ = ["autograd", "q_sample", "ddim_step", "ddpm_step", "hybrid_loss", "hybrid_loss_backward", "group_norm_act",
           "philox_normal", "philox_normal_like",
           "attention_qkv"]
