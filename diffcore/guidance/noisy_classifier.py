"""A noise-aware image classifier p_phi(y | x_t, t) for classifier guidance, and a short training loop.

The network is the U-Net's down path (as ADM's classifier is the U-Net's encoder, without attention here):
a 3x3 conv, per level ``num_res_blocks`` residual blocks conditioned on the timestep embedding and a 2x
downsampling between levels, one more residual block, then GroupNorm, SiLU, global average pooling and a
linear layer to K logits. It is trained with cross-entropy on x_t = q_sample(x0, noise, t) at uniform t.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .. import ops
from ..unet.blocks import Downsample, EmbedSequential, ResBlock, conv3x3, normalization, timestep_embedding
from ..unet.config import UNetConfig

__all__ = ["NoisyClassifier", "train_noisy_classifier", "noisy_accuracy"]


class NoisyClassifier(nn.Module):
    """Timestep-conditioned CNN classifier: ``classifier(x_t [B, C, H, W], t [B]) -> logits [B, K]``.

    Args:
        config: a :class:`~diffcore.unet.UNetConfig` with ``num_classes = K``; uses ``in_channels``,
            ``model_channels``, ``channel_mult``, ``num_res_blocks``, ``dropout``, ``use_scale_shift_norm``,
            ``conv_resample``, ``norm_groups`` (attention and ``learn_sigma`` are ignored). H and W must be
            multiples of ``config.size_multiple``. E.g. ``UNetConfig(in_channels=1, model_channels=32,
            channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(), image_size=28, num_classes=10)``.
    Attributes: ``config``, ``num_classes`` (K; checked against guidance labels).
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        if not isinstance(config, UNetConfig):
            raise TypeError(f"config: expected a UNetConfig, got {type(config).__name__}")
        if config.num_classes is None:
            raise ValueError("config: expected num_classes = the number of classes K, got None")
        self.config = config
        self.num_classes = config.num_classes
        emb_dim = config.time_embed_dim
        self.time_embed = nn.Sequential(nn.Linear(config.model_channels, emb_dim), nn.SiLU(),
                                        nn.Linear(emb_dim, emb_dim))
        ch = config.model_channels
        layers: list[nn.Module] = [conv3x3(config.in_channels, ch)]
        for level, width in enumerate(config.level_channels):
            for _ in range(config.num_res_blocks):
                layers.append(ResBlock(config, ch, width))
                ch = width
            if level != config.num_levels - 1:
                layers.append(Downsample(ch, config.conv_resample))
        layers.append(ResBlock(config, ch, ch))
        self.body = EmbedSequential(*layers)
        self.head = nn.Sequential(normalization(config, ch), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(ch, config.num_classes))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, K]`` (the parameters' dtype) for noisy images x ``[B, in_channels, H, W]`` (float) at
        timesteps t ``[B]`` (int64 original steps, or float)."""
        cfg = self.config
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != cfg.in_channels:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x: expected a tensor [B, {cfg.in_channels}, H, W], got {got}")
        if x.shape[2] % cfg.size_multiple or x.shape[3] % cfg.size_multiple:
            raise ValueError(f"x: expected H and W multiples of {cfg.size_multiple}, got {tuple(x.shape[2:])}")
        if not isinstance(t, torch.Tensor) or t.shape != (x.shape[0],):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"t: expected a tensor [{x.shape[0]}] of timesteps, got {got}")
        weight = self.time_embed[0].weight
        emb = self.time_embed(timestep_embedding(t, cfg.model_channels).to(weight.dtype))
        return self.head(self.body(x.to(weight.dtype), emb))


def _check_labeled_images(images, labels, alphas_cumprod) -> None:
    """images float ``[N, C, H, W]`` (N >= 1), labels int64 ``[N]``, alphas_cumprod a 1-D float64 table, or a named
    error."""
    if not isinstance(images, torch.Tensor) or not images.is_floating_point() or images.dim() != 4 \
            or images.shape[0] == 0:
        raise TypeError(f"images: expected a non-empty float tensor [N, C, H, W], got "
                        f"{getattr(images, 'shape', type(images).__name__)}")
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or labels.shape != images.shape[:1]:
        got = f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels: expected int64 [{images.shape[0]}] (one per image), got {got}")
    if not isinstance(alphas_cumprod, torch.Tensor) or alphas_cumprod.dtype != torch.float64 \
            or alphas_cumprod.dim() != 1:
        raise TypeError("alphas_cumprod: expected a 1-D float64 abar table")


def train_noisy_classifier(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                           alphas_cumprod: torch.Tensor, *, steps: int = 1000, batch_size: int = 128,
                           lr: float = 3e-4, weight_decay: float = 0.05, seed: int = 0,
                           progress: bool = True) -> torch.Tensor:
    """Train ``classifier`` in place by cross-entropy on noised images (ADM's classifier recipe, shortened).

    Each step draws ``batch_size`` indices and timesteps t ~ U{0..T-1} (CPU generator seeded by ``seed``) and
    Gaussian noise (a generator on the classifier's device, seeded by ``seed``), forms
    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise with :func:`diffcore.ops.q_sample`, and takes an AdamW step.

    Args:
        classifier: ``classifier(x_t, t) -> logits [B, K]`` with parameters (e.g. :class:`NoisyClassifier`).
        images: float ``[N, C, H, W]`` training images in the diffusion's data range ([-1, 1]); any device.
        labels: int64 ``[N]`` in [0, K).
        alphas_cumprod: float64 ``[T]`` abar of the diffusion the classifier will guide.
        steps, batch_size, lr, weight_decay: the optimization (AdamW).
        progress: tqdm bar (the loss is shown every 50 steps).
    Returns: the per-step mean cross-entropy in nats, float32 ``[steps]`` on the CPU.
    """
    _check_labeled_images(images, labels, alphas_cumprod)
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    params = [p for p in classifier.parameters() if p.requires_grad]
    if not params:
        raise ValueError("classifier: expected trainable parameters, found none")
    device, dtype = params[0].device, params[0].dtype
    abar = alphas_cumprod.to(device)
    cpu_gen = torch.Generator().manual_seed(seed)
    noise_gen = torch.Generator(device=device).manual_seed(seed)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    losses = torch.zeros(steps, dtype=torch.float32, device=device)
    classifier.train()
    bar = tqdm(range(steps), disable=not progress, desc="noisy classifier", leave=False)
    for step in bar:
        index = torch.randint(0, images.shape[0], (batch_size,), generator=cpu_gen)
        t = torch.randint(0, abar.numel(), (batch_size,), generator=cpu_gen).to(device)
        x0 = images[index.to(images.device)].to(device=device, dtype=dtype)
        noise = torch.randn(x0.shape, generator=noise_gen, device=device, dtype=dtype)
        x_t = ops.q_sample(x0, noise, t, abar, check_values=False)
        loss = F.cross_entropy(classifier(x_t, t), labels[index.to(labels.device)].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses[step] = loss.detach()
        if progress and step % 50 == 0:
            bar.set_postfix(loss=f"{float(loss):.3f}")
    classifier.eval()
    return losses.cpu()


@torch.no_grad()
def noisy_accuracy(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor, alphas_cumprod: torch.Tensor,
                   timesteps: "list[int] | tuple[int, ...]", *, batch_size: int = 500, seed: int = 0) -> list[float]:
    """Accuracy of ``classifier`` on noised images, one number per timestep: the fraction of ``images`` whose
    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise it assigns to their label (argmax of the logits).

    The noise is ``torch.randn`` from a generator on the classifier's device seeded by ``seed``, drawn for the
    images in order in chunks of ``batch_size`` (``[min(batch_size, rest), C, H, W]`` in the parameters' dtype),
    the same draws for every t, so the numbers at different t differ by the noise level only.

    Args:
        classifier: ``classifier(x_t, t) -> logits [B, K]`` (e.g. :class:`NoisyClassifier`; run in eval mode, its
            mode is restored afterwards).
        images: float ``[N, C, H, W]`` held-out images in [-1, 1]; labels: int64 ``[N]``.
        alphas_cumprod: float64 ``[T]`` abar of the process; timesteps: ints in [0, T).
    Returns: accuracies in [0, 1], one per entry of ``timesteps``.
    """
    _check_labeled_images(images, labels, alphas_cumprod)
    T = alphas_cumprod.numel()
    bad = [t for t in timesteps if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < T]
    if bad or not timesteps:
        raise ValueError(f"timesteps: expected a non-empty list of ints in [0, {T}), got {list(timesteps)!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
    weight = next(classifier.parameters())
    device, dtype = weight.device, weight.dtype
    abar = alphas_cumprod.to(device)
    was_training = classifier.training
    classifier.eval()
    correct = [0] * len(timesteps)
    try:
        generator = torch.Generator(device=device).manual_seed(seed)
        for start in range(0, images.shape[0], batch_size):
            x0 = images[start:start + batch_size].to(device=device, dtype=dtype)
            y = labels[start:start + batch_size].to(device)
            noise = torch.randn(x0.shape, generator=generator, device=device, dtype=dtype)
            for i, t in enumerate(timesteps):
                tt = torch.full((x0.shape[0],), t, dtype=torch.int64, device=device)
                x_t = ops.q_sample(x0, noise, tt, abar, check_values=False)
                correct[i] += int((classifier(x_t, tt).argmax(1) == y).sum())
    finally:
        classifier.train(was_training)
    return [c / images.shape[0] for c in correct]
