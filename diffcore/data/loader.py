"""Decoding batches of a streaming source in ``torch.utils.data.DataLoader`` worker processes.

The order is decided in the main process (:class:`diffcore.data.ShardedBatches` hands over the index list of
each batch); a worker decodes one whole batch, so the DataLoader delivers batches in the order asked for whatever
the number of workers. A worker never raises: a bad image comes back as its error (re-raised in the main process
as one clear message naming the file) or, with ``skip_bad_images``, is replaced by the next good image of the
data set (index ``i + 1``, ``i + 2``, ... wrapping around), deterministically, and reported.
"""
from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import numpy as np
import torch

from .sources import BadImageError, ImageSource

__all__ = ["DecodedBatch", "BatchDecoder", "decoded_batches"]


@dataclass
class DecodedBatch:
    """One batch as a worker returns it: uint8 ``pixels`` ``[B, C, S, S]``, the ``indices`` actually used
    (int64 ``[B]``; differ from the asked ones where images were skipped), the names of the skipped files, the
    ``ticket`` the order attached to the request, or the ``error`` that stopped it."""

    pixels: Optional[torch.Tensor]
    indices: Optional[torch.Tensor]
    skipped: list[str]
    ticket: object
    error: Optional[BaseException] = None

    def pin_memory(self) -> "DecodedBatch":
        """The same batch with its pixels in pinned memory (DataLoader's ``pin_memory=True`` calls this)."""
        if self.pixels is not None:
            self.pixels = self.pixels.pin_memory()
        return self


class BatchDecoder(torch.utils.data.Dataset):
    """``decoder[(ticket, indices)]`` decodes the images ``indices`` of ``source`` into one :class:`DecodedBatch`."""

    def __init__(self, source: ImageSource, skip_bad_images: bool = False):
        self.source, self.skip_bad_images = source, bool(skip_bad_images)

    def __len__(self) -> int:
        return len(self.source)

    def _one(self, index: int, skipped: list[str]) -> tuple[int, np.ndarray]:
        n = len(self.source)
        for attempt in range(n):
            candidate = (index + attempt) % n
            try:
                return candidate, self.source[candidate]
            except BadImageError as error:
                if not self.skip_bad_images:
                    raise
                skipped.append(str(error))
        raise BadImageError(f"no image of the data set could be read ({n} tried); the first error: {skipped[0]}")

    def __getitem__(self, request: tuple[object, list[int]]) -> DecodedBatch:
        ticket, indices = request
        skipped: list[str] = []
        try:
            used, arrays = zip(*(self._one(int(i), skipped) for i in indices))
            pixels = torch.from_numpy(np.stack(arrays))
        except Exception as error:  # noqa: BLE001 - handed to the main process, which raises it
            return DecodedBatch(None, None, skipped, ticket, error)
        return DecodedBatch(pixels, torch.tensor(used, dtype=torch.int64), skipped, ticket)


def _keep(batch: DecodedBatch) -> DecodedBatch:
    return batch


def _ignore_stop_signals(worker_id: int) -> None:
    """Workers leave Ctrl-C (sent to the whole process group) and SIGTERM to the main process, which finishes its
    step, checkpoints and shuts them down; a worker whose main process died exits by itself (DataLoader's
    watchdog)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def decoded_batches(source: ImageSource, requests: Iterable[tuple[object, list[int]]], *, num_workers: int = 0,
                    skip_bad_images: bool = False, pin_memory: bool = False, prefetch_factor: int = 4
                    ) -> Iterator[DecodedBatch]:
    """Decode the batches ``requests`` (an iterable, possibly endless, of ``(ticket, indices)``) in order, in
    ``num_workers`` DataLoader worker processes (0: in this process). Each worker keeps ``prefetch_factor``
    batches in flight."""
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers: expected an int >= 0, got {num_workers!r}")
    loader = torch.utils.data.DataLoader(
        BatchDecoder(source, skip_bad_images), sampler=requests, batch_size=None, num_workers=num_workers,
        collate_fn=_keep, pin_memory=pin_memory, worker_init_fn=_ignore_stop_signals, prefetch_factor=prefetch_factor if num_workers else None)
    return iter(loader)
