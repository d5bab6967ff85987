"""Pure-torch reference implementations of the fused ops (fallback and test oracle)."""
from . import autograd
from .ops import ddim_step, ddpm_step, hybrid_loss, hybrid_loss_backward, q_sample
from .philox import philox_normal, philox_normal_like

__all__ = ["autograd", "q_sample", "ddim_step", "ddpm_step", "hybrid_loss", "hybrid_loss_backward", "philox_normal",
           "philox_normal_like"]
