"""Data order: which sample lands in which global batch, its augmentation seed, and each process's
rows of every global batch (a function of seed, epoch and index alone)."""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import numpy as np

from ..data import stream_batches


# ---- data ---------------------------------------------------------------------------------------
def epoch_order(num: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled order of an epoch: a pure function of (seed, epoch) so resumes see the same data."""
    return np.random.default_rng([seed, epoch]).permutation(num)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A sample's augmentation seed: a function of (seed, epoch, dataset index) only, so neither
    a resume nor the number of processes changes any crop, op, magnitude or erasing box."""
    return int(np.random.default_rng([seed, epoch, int(index)]).integers(2 ** 31))


def batch_mix_rng(seed: int, step: int) -> np.random.Generator:
    """The random stream of global batch `step`'s mixup/cutmix draw (its own spawn key: no
    overlap with the per-sample streams)."""
    return np.random.default_rng(np.random.SeedSequence([seed, step], spawn_key=(1,)))


@dataclasses.dataclass
class TrainBatch:
    """This process's rows of one global batch."""
    images: np.ndarray  # (b, H, W, 3) uint8
    labels: np.ndarray  # (b,) int32
    weights: np.ndarray  # (b,) float32, 0 for an image that failed to decode
    seeds: np.ndarray  # (b,) int32 per-sample augmentation seeds
    epoch: int
    errors: list  # (path, reason) of the images that failed to decode
    positions: Optional[np.ndarray] = None  # streamed sources: this process's streams' positions after it


def train_batches(refs, labels, batch_size: int, seed: int, start_step: int, decoder, image_shape,
                  rows: Optional[slice] = None):
    """Endless TrainBatch-es (this process's `rows` of each global batch of `batch_size`) from
    global step `start_step` on.

    Drops the last partial global batch of each epoch (as timm's train loader does); each sample
    gets its own augmentation seed from (seed, epoch, index).
    """
    rows = rows or slice(0, batch_size)
    steps_per_epoch = len(refs) // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(refs)} training images is less than one batch of {batch_size}")
    epoch, offset = divmod(start_step, steps_per_epoch)
    while True:
        order = epoch_order(len(refs), seed, epoch)
        picks = np.concatenate([order[k * batch_size + rows.start: k * batch_size + rows.stop]
                                for k in range(offset, steps_per_epoch)])
        seeded = (dataclasses.replace(refs[p], seed=sample_seed(seed, epoch, p), index=j) for j, p in enumerate(picks))
        for hb in stream_batches(seeded, rows.stop - rows.start, decoder, image_shape):
            seeds = np.asarray([r.seed for r in hb.refs], np.int32)
            errors = [(refs[picks[j]].id, reason) for j, reason in hb.errors]
            yield TrainBatch(hb.images, labels[picks[hb.indices]], hb.valid.astype(np.float32), seeds, epoch, errors)
        epoch, offset = epoch + 1, 0


def eval_slots(num: int, batch_size: int, rows: Optional[slice] = None) -> list:
    """Indices (-1: padding) this process evaluates: its rows of each global batch of the val set."""
    rows = rows or slice(0, batch_size)
    return [g if g < num else -1 for k in range(math.ceil(num / batch_size))
            for g in range(k * batch_size + rows.start, k * batch_size + rows.stop)]
