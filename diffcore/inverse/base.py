"""The linear-operator contract shared by every degradation operator, with its input checks.

A degradation operator maps images ``x`` (``[B, C, H, W]``, any float dtype, values usually in [-1, 1]) to
measurements ``y = A(x)`` (``[B, *measurement_shape]``). Every operator here is linear, so it also has the exact
adjoint ``A^T`` (the transpose: ``<A x, y> = <x, A^T y>`` to float rounding) and a pseudo-inverse (the Moore-Penrose
inverse where it has a closed form, a back-projection or a damped least-squares solve otherwise). All three maps
are torch computations on the input's device and dtype, differentiable with autograd.

Operators are ``torch.nn.Module`` s, so ``op.to(device)`` moves their masks / kernels / matrices; their buffers
are float64 and are cast to the input's dtype on use.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..checks import FLOAT_DTYPES

__all__ = ["LinearOperator", "check_image_shape", "check_batch", "batch_dot"]


def check_image_shape(name: str, image_shape: Sequence[int]) -> tuple[int, int, int]:
    """Validate an image shape ``(C, H, W)`` of positive ints and return it as a tuple."""
    try:
        shape = tuple(image_shape)
    except TypeError:
        raise TypeError(f"{name}: expected a (C, H, W) tuple of ints, got {type(image_shape).__name__}") from None
    if len(shape) != 3 or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape):
        raise ValueError(f"{name}: expected a (C, H, W) tuple of 3 ints, got {image_shape!r}")
    if min(shape) < 1:
        raise ValueError(f"{name}: expected positive sizes, got {shape}")
    return shape  # type: ignore[return-value]


def check_batch(name: str, tensor: torch.Tensor, shape: Sequence[int], what: str) -> None:
    """``tensor`` must be a float tensor ``[B, *shape]``; the error names ``name`` and says what differs."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a float tensor, got dtype {tensor.dtype}")
    expected = tuple(shape)
    if tensor.dim() != len(expected) + 1:
        raise ValueError(f"{name}: expected a {len(expected) + 1}-D tensor [B, {', '.join(map(str, expected))}] "
                         f"({what}), got shape {tuple(tensor.shape)}")
    got = tuple(tensor.shape[1:])
    if got != expected:
        if len(expected) == 3 and got[0] != expected[0]:
            raise ValueError(f"{name}: expected {expected[0]} channels ({what} {expected}), got {got[0]} "
                             f"(shape {tuple(tensor.shape)})")
        raise ValueError(f"{name}: expected shape [B, {', '.join(map(str, expected))}] ({what}), "
                         f"got {tuple(tensor.shape)}")


def batch_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample inner products ``[B]`` of two tensors ``[B, ...]``."""
    return (a * b).flatten(1).sum(dim=1)


class LinearOperator(torch.nn.Module):
    """Base class of the degradation operators: ``forward`` (A), ``adjoint`` (A^T) and ``pseudo_inverse``.

    Subclasses set ``name`` (the task name of :func:`diffcore.inverse.make_operator`), ``image_shape`` and
    ``measurement_shape`` and implement ``_forward_map`` (A on a checked batch). ``_adjoint_map`` defaults to the
    vector-Jacobian product of ``_forward_map`` (exact for a linear map); subclasses override it with an explicit
    transpose where one is simple. ``pseudo_inverse`` defaults to :meth:`least_squares`.
    """

    name: str = "linear"
    #: True for every operator here; a nonlinear operator would only offer ``forward``.
    linear: bool = True

    def __init__(self, image_shape: Sequence[int]):
        super().__init__()
        self.image_shape: tuple[int, int, int] = check_image_shape("image_shape", image_shape)
        self.measurement_shape: tuple[int, ...] = self.image_shape

    # -- the public maps ------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = A(x): ``x`` ``[B, C, H, W]`` (``image_shape``) -> ``[B, *measurement_shape]``, in x's dtype."""
        check_batch("x", x, self.image_shape, f"the image_shape the {self.name!r} operator was built for")
        return self._forward_map(x)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """x = A^T(y): ``y`` ``[B, *measurement_shape]`` -> ``[B, C, H, W]``; the exact transpose of forward."""
        self._check_measurement(y)
        return self._adjoint_map(y)

    def transpose(self, y: torch.Tensor) -> torch.Tensor:
        """Alias of :meth:`adjoint`."""
        return self.adjoint(y)

    def pseudo_inverse(self, y: torch.Tensor) -> torch.Tensor:
        """An image ``[B, C, H, W]`` consistent with ``y``: see each operator; here :meth:`least_squares`."""
        return self.least_squares(y)

    def least_squares(self, y: torch.Tensor, damping: float = 1e-3, iterations: int = 100) -> torch.Tensor:
        """argmin_x ||A x - y||^2 + damping ||x||^2 per image, by conjugate gradients on the normal equations.

        Starts from x = 0, so with ``damping = 0`` it converges to the minimum-norm least-squares solution
        (the Moore-Penrose pseudo-inverse applied to y); a positive damping is Tikhonov regularization, which
        keeps ill-conditioned operators (blur, sparse-view CT) from amplifying noise. A fixed number of
        iterations (no data-dependent stopping, so no host-device sync). Differentiable in ``y``.

        Args: y ``[B, *measurement_shape]``; damping >= 0; iterations >= 1. Returns ``[B, C, H, W]``.
        """
        self._check_measurement(y)
        if not damping >= 0.0:
            raise ValueError(f"damping: expected a float >= 0, got {damping}")
        if not (isinstance(iterations, int) and iterations >= 1):
            raise ValueError(f"iterations: expected an int >= 1, got {iterations!r}")
        rhs = self._adjoint_map(y)
        x = torch.zeros_like(rhs)
        r = rhs
        p = r
        rr = batch_dot(r, r)
        # an image whose residual has fallen to rounding level stops moving (a singular A^T A would otherwise
        # divide rounding noise by rounding noise); decided per image on the device, without a sync
        floor = rr * (100.0 * torch.finfo(rhs.dtype).eps) ** 2
        shape = (-1,) + (1,) * (rhs.dim() - 1)
        zero = torch.zeros_like(rr)
        for _ in range(iterations):
            q = self._adjoint_map(self._forward_map(p)) + damping * p
            pq = batch_dot(p, q)
            active = (rr > floor) & (pq > 0)
            alpha = torch.where(active, rr / torch.where(active, pq, torch.ones_like(pq)), zero)
            x = x + alpha.reshape(shape) * p
            r = r - alpha.reshape(shape) * q
            rr_new = batch_dot(r, r)
            beta = torch.where(active, rr_new / torch.where(active, rr, torch.ones_like(rr)), zero)
            p = r + beta.reshape(shape) * p
            rr = torch.where(active, rr_new, rr)
        return x

    @torch.no_grad()
    def spectral_norm(self, iterations: int = 100, seed: int = 0) -> float:
        """Estimate of ||A||_2, the largest singular value, by power iteration on A^T A (float64, on the
        buffers' device). Useful to put DPS step sizes on a common scale across operators: masks and blurs have
        norm 1 (blurs slightly more, from the reflected border), average pooling 1/f, the Radon transform about
        sqrt(n_angles * diameter) (43 for 60 views of 32 x 32)."""
        device = next((b.device for b in self.buffers()), torch.device("cpu"))
        g = torch.Generator(device=device).manual_seed(int(seed))
        v = torch.randn((1,) + self.image_shape, generator=g, dtype=torch.float64, device=device)
        norm = v.new_zeros(())
        for _ in range(iterations):
            v = v / v.norm()
            w = self._adjoint_map(self._forward_map(v))
            norm = w.norm()
            v = w
        return float(norm.sqrt())

    def extra_repr(self) -> str:
        return f"name={self.name!r}, image_shape={self.image_shape}, measurement_shape={self.measurement_shape}"

    def _check_measurement(self, y: torch.Tensor, name: str = "y") -> None:
        check_batch(name, y, self.measurement_shape, f"the measurement_shape of the {self.name!r} operator")

    # -- what subclasses implement ----------------------------------------------------------------------------
    def _forward_map(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _adjoint_map(self, y: torch.Tensor) -> torch.Tensor:
        """Vector-Jacobian product of ``_forward_map`` at 0: exactly A^T y for a linear ``_forward_map``."""
        with torch.enable_grad():
            x = torch.zeros((y.shape[0],) + self.image_shape, dtype=y.dtype, device=y.device, requires_grad=True)
            (grad,) = torch.autograd.grad(self._forward_map(x), x, grad_outputs=y, create_graph=y.requires_grad)
        return grad

    def _buffer(self, tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A float64 buffer cast to ``like``'s dtype and device (no copy when they match)."""
        return tensor.to(device=like.device, dtype=like.dtype)
