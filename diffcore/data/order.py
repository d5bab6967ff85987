"""The order of training batches: seeded per epoch, split across DDP ranks, resumable to the sample.

:class:`ShardedBatches` serves an endless stream of batches of an in-memory :class:`~diffcore.data.ImageDataset`
(assembled directly) or of a streaming :class:`~diffcore.data.sources.ImageSource` (decoded in DataLoader
workers, :mod:`diffcore.data.loader`), in the same order for both: so streaming a folder and loading it into
memory give the same batches, batch for batch.
"""
from __future__ import annotations

from typing import Iterator, Optional, Union

import torch

from .loader import DecodedBatch, decoded_batches
from .memory import ImageDataset, to_model_batch
from .sources import ImageSource

__all__ = ["distributed_info", "epoch_order", "ShardedBatches"]


def distributed_info() -> tuple[int, int]:
    """``(rank, world_size)`` of the default torch.distributed group, ``(0, 1)`` when none is initialised."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def epoch_order(n: int, seed: int, epoch: int, hflip: bool, rank: int = 0, world_size: int = 1
                ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The images of epoch ``epoch`` that rank ``rank`` of ``world_size`` visits, in order, and their flip bits:
    a permutation of ``range(n)`` drawn from a CPU generator seeded ``seed + epoch`` (then ``n`` flip bits from
    it when ``hflip``), of which the rank takes positions ``rank, rank + world_size, ...`` (as
    ``DistributedSampler``). Returns ``(indices int64 [~n / world_size], flips bool [same] or None)``."""
    generator = torch.Generator().manual_seed(seed + epoch)
    perm = torch.randperm(n, generator=generator)
    flips = torch.randint(0, 2, (n,), generator=generator).bool() if hflip else None
    mine = slice(rank, None, world_size)
    return perm[mine], (flips[mine] if flips is not None else None)


class ShardedBatches:
    """An endless stream of shuffled batches, sharded across DDP ranks, with a resumable position.

    Epoch ``e`` visits the images in the order of :func:`epoch_order`; the last incomplete global batch of an
    epoch is dropped. So the union of the ranks' k-th batches, in global order (position ``j * W + r`` for local
    position ``j`` of rank ``r``), is exactly the k-th batch a single process with batch ``W * batch_size`` sees.

    Args:
        dataset: an in-memory :class:`ImageDataset` (batches assembled on its device) or a streaming source
            (batches decoded in ``num_workers`` DataLoader workers, then moved to ``device``).
        batch_size: images per batch on this rank.
        seed: shuffling seed (the same on every rank).
        rank, world_size: default: from torch.distributed if initialised, else 0 and 1.
        num_workers: worker processes decoding a streaming source (0: in this process). Ignored in memory.
        skip_bad_images: a streaming source's unreadable image is replaced by the next good one and counted
            (:attr:`skipped`, :attr:`skipped_names`) instead of raising an error naming it.
        device: where a streaming source's batches go (default: the CPU).
    Yields ``(x float32 [batch_size, C, S, S] in [-1, 1], labels int64 [batch_size])``.

    Resume: ``state_dict()`` / ``load_state_dict()`` save and restore the position (epoch, batch) of the next
    batch to be served; batches that workers decoded ahead are simply decoded again. A restored stream serves
    the same batches whatever ``num_workers`` is, and, for the same global batch (``batch_size * world_size``),
    whatever the number of ranks: the global batches are the same images in the same order.
    """

    def __init__(self, dataset: Union[ImageDataset, ImageSource], batch_size: int, *, seed: int = 0,
                 rank: Optional[int] = None, world_size: Optional[int] = None, num_workers: int = 0,
                 skip_bad_images: bool = False, device: "torch.device | str | None" = None):
        default_rank, default_world = distributed_info()
        self.rank = default_rank if rank is None else int(rank)
        self.world_size = default_world if world_size is None else int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank: expected 0 <= rank < world_size={self.world_size}, got {self.rank}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        if not isinstance(dataset, (ImageDataset, ImageSource)):
            raise TypeError(f"dataset: expected an ImageDataset or a streaming ImageSource, got "
                            f"{type(dataset).__name__}")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, int(seed)
        self.streaming = isinstance(dataset, ImageSource)
        self.num_workers, self.skip_bad_images = num_workers, bool(skip_bad_images)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.batches_per_epoch = len(dataset) // (batch_size * self.world_size)
        if self.batches_per_epoch == 0:
            raise ValueError(f"batch_size: the global batch {batch_size} x {self.world_size} ranks is larger than the "
                             f"data set ({len(dataset)} images)")
        self.epoch, self.position = 0, 0
        self.skipped, self.skipped_names = 0, []  # bad images replaced (with skip_bad_images), this process
        self._order: Optional[tuple[int, torch.Tensor, Optional[torch.Tensor]]] = None
        self._stream: Optional[Iterator[DecodedBatch]] = None

    def _epoch_order(self, epoch: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, *epoch_order(len(self.dataset), self.seed, epoch, self.dataset.hflip, self.rank,
                                               self.world_size))
        return self._order[1], self._order[2]

    def _window(self, epoch: int, position: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        indices, flips = self._epoch_order(epoch)
        window = slice(position * self.batch_size, (position + 1) * self.batch_size)
        return indices[window], (None if flips is None else flips[window])

    def _requests(self, epoch: int, position: int) -> Iterator[tuple[tuple[int, int], list[int]]]:
        """Endless ``((epoch, position), indices)`` from a position on (its own order cache: it runs ahead)."""
        while True:
            perm, _ = epoch_order(len(self.dataset), self.seed, epoch, False, self.rank, self.world_size)
            for p in range(position, self.batches_per_epoch):
                yield (epoch, p), perm[p * self.batch_size:(p + 1) * self.batch_size].tolist()
            epoch, position = epoch + 1, 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        indices, flips = self._window(self.epoch, self.position)
        if self.streaming:
            batch = self._next_decoded()
            x = to_model_batch(batch.pixels.to(self.device, non_blocking=True), flips, self.dataset.pad_to)
            out = (x, self.dataset.labels[batch.indices].to(self.device))
        else:
            out = self.dataset.batch(indices, flips)
        self.position += 1
        if self.position == self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        return out

    def _next_decoded(self) -> DecodedBatch:
        if self._stream is None:
            self._stream = decoded_batches(self.dataset, self._requests(self.epoch, self.position),
                                           num_workers=self.num_workers, skip_bad_images=self.skip_bad_images,
                                           pin_memory=self.device.type == "cuda")
        batch = next(self._stream)
        if batch.error is not None:
            self.close()
            raise batch.error
        assert batch.ticket == (self.epoch, self.position), (batch.ticket, self.epoch, self.position)
        if batch.skipped:
            self.skipped += len(batch.skipped)
            self.skipped_names.extend(batch.skipped[:max(0, 100 - len(self.skipped_names))])
        return batch

    def close(self) -> None:
        """Stop the decoding workers (a later batch starts them again at the current position)."""
        self._stream = None

    def state_dict(self) -> dict:
        """``{"epoch", "position", "seed", "world_size", "batch_size"}`` (plain ints, JSON-friendly)."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "world_size": self.world_size,
                "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        """Restore a position saved by :meth:`state_dict`. The seed and the global batch (``batch_size *
        world_size``) must match; the split across ranks may differ."""
        if int(state["seed"]) != self.seed:
            raise ValueError(f"data stream state: seed was {state['seed']} when saved, is {self.seed} now")
        saved_global = int(state["batch_size"]) * int(state["world_size"])
        if saved_global != self.batch_size * self.world_size:
            raise ValueError(f"data stream state: the global batch (batch_size x world_size) was {state['batch_size']}"
                             f" x {state['world_size']} = {saved_global} when saved, is {self.batch_size} x "
                             f"{self.world_size} = {self.batch_size * self.world_size} now")
        self.close()
        self.epoch, self.position, self._order = int(state["epoch"]), int(state["position"]), None
