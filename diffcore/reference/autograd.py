"""Gradients of the fused ops from their pure-torch twins: the fused ops' backward formulas.

The fused kernels compute the forward pass. Their backward is the vector-Jacobian product of the reference
function (``diffcore.reference.ops``) run under autograd on the saved inputs: the formulas stay written once
in C++ (forward) and once in Python (reference, whose autograd graph gives the backward), with no third,
hand-derived copy. The gradients are therefore exactly those of the reference path, including the clamp of
``clip_denoised`` (torch.clamp's subgradient), the learned variance channel, the noise and the schedule table.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch


def reference_vjp(fn: Callable, inputs: Sequence, needs_grad: Sequence[bool],
                  grad_outputs: Sequence[Optional[torch.Tensor]]) -> tuple[Optional[torch.Tensor], ...]:
    """Gradients of ``sum_k <grad_outputs[k], fn(*inputs)[k]>`` with respect to each input flagged in
    ``needs_grad`` (None for the others, and for inputs the outputs do not depend on, as torch gives).

    Args: ``fn`` a reference op; ``inputs`` its positional arguments (tensors and Python values, as the op
    schema takes them); ``needs_grad`` one flag per input (``ctx.needs_input_grad``); ``grad_outputs`` one
    tensor (or None: no gradient) per output of ``fn``, shaped like that output.
    When called with grad mode on (``backward(create_graph=True)``) the gradients are themselves differentiable
    with respect to the inputs, so higher derivatives work too.
    """
    create_graph = torch.is_grad_enabled()
    wanted = [i for i, (value, need) in enumerate(zip(inputs, needs_grad))
              if need and isinstance(value, torch.Tensor)]
    result: list[Optional[torch.Tensor]] = [None] * len(inputs)
    if not wanted:
        return tuple(result)
    with torch.enable_grad():
        args = list(inputs)
        if not create_graph:  # a fresh graph on detached leaves: nothing leaks into the caller's graph
            for i in wanted:
                args[i] = inputs[i].detach().requires_grad_(True)
        outputs = fn(*args)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        pairs = [(out, grad) for out, grad in zip(outputs, grad_outputs)
                 if grad is not None and out.requires_grad]
        if not pairs:
            return tuple(result)
        grads = torch.autograd.grad([out for out, _ in pairs], [args[i] for i in wanted],
                                    [grad.to(out.dtype) for out, grad in pairs], allow_unused=True,
                                    create_graph=create_graph)
    for i, grad in zip(wanted, grads):
        result[i] = grad
    return tuple(result)


class _RefuseGradient(torch.autograd.Function):
    """Identity whose backward raises: marks an input that an op gives no gradient by design."""

    @staticmethod
    def forward(ctx, tensor, message):
        ctx.message = message
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError(ctx.message)


def refuse_gradient(tensor: torch.Tensor, message: str) -> torch.Tensor:
    """``tensor`` itself, except that a backward pass reaching it raises RuntimeError(message) instead of
    silently giving no gradient. Returns ``tensor`` unchanged when it does not require grad."""
    if not (torch.is_grad_enabled() and tensor.requires_grad):
        return tensor
    return _RefuseGradient.apply(tensor, message)
