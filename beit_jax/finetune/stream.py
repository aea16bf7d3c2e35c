"""Fine-tuning from webdataset shards: a streamed source's order, and a position to resume from.

Shards are read whole and in one pass each (as extraction reads them), never listed sample by
sample. The order is a function of the seed alone, the same on any number of hosts:

- `streams` (S) logical streams, fixed for a run: each epoch, every stream's shards are
  `epoch_order(num_shards, seed, epoch)[s::S]` (a seeded shard order per epoch, split over the
  streams); stream s fills rows [s*B/S, (s+1)*B/S) of every global batch of B.
- Each stream reads its shards in groups of `shuffle_shards` (K) and emits the group's samples in
  a seeded permutation (rng(seed, epoch, stream, group)): a shuffle buffer of K shards' samples,
  exactly reproducible. The next group streams in (a background thread) while one is emitted.
- A stream's position is (epoch, group, offset): a resume re-reads only the current group of K
  shards and skips `offset` samples, so it continues the same sample stream exactly.
- Host h of H serves streams [h*S/H, (h+1)*S/H) (S must be a multiple of H, B of S): it reads
  only its streams' shards, i.e. only its rows of every global batch. A resume on another number of
  hosts works wherever S is a multiple of it (S = 8: 1, 2, 4 or 8 hosts).
- A sample's augmentation seed is `sample_seed(seed, epoch, index)` with index = (shard number in
  the sorted shard list) * 2**24 + (its place in the shard): the same on any number of hosts.

Labels come from each sample's members: `label_key` names a member (`cls`, webdataset's class
index, or `label.txt`, ...) or else a field of its `.json` member; ints are class indices, strings
class names looked up in `classes`. A sample without a usable label counts as a bad input (weight
0 in its batch, with a warning), as an image that fails to decode does.

Approximate, compared to a listed source: the shuffle is per group of K shards, not global; each
stream runs through its epochs independently (streams of unequal size reach their next epoch at
different steps), so the reported epoch is the lowest of this host's streams.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ..data import stream_batches
from ..sources import ImageRef, TarShard, prefetch, stream_tar
from .order import TrainBatch, epoch_order, sample_seed

SHARD_STRIDE = 1 << 24  # index = shard * SHARD_STRIDE + place in the shard


@dataclasses.dataclass(frozen=True)
class StreamedSource:
    """Webdataset shards to fine-tune on, and how to read their labels."""
    shards: Tuple[TarShard, ...]
    label_key: str = "cls"
    classes: Optional[Tuple[str, ...]] = None  # names, for string labels (and the class names of the export)
    num_classes: Optional[int] = None

    @property
    def class_names(self) -> List[str]:
        return list(self.classes) if self.classes else [str(i) for i in range(self.num_classes or 0)]

    def fingerprint(self) -> Dict[str, object]:
        """What a checkpoint records so that a resume on other shards is refused."""
        return {"shards": len(self.shards), "first": self.shards[0].url, "last": self.shards[-1].url,
                "label_key": self.label_key}


def check_streams(streams: int, num_shards: int, batch_size: int, processes: int) -> None:
    if streams < 1 or streams > num_shards:
        raise ValueError(f"`streams` must be between 1 and the number of shards ({num_shards}), got {streams}")
    if batch_size % streams:
        raise ValueError(f"batch size {batch_size} must be a multiple of `streams` ({streams}): each stream fills "
                         f"batch_size / streams rows of every global batch")
    if streams % processes:
        raise ValueError(f"`streams` ({streams}) must be a multiple of the number of processes ({processes}): each "
                         f"process reads whole streams (a run resumes on any process count that divides its streams)")


def label_of(ref: ImageRef, label_key: str, class_index: Optional[Dict[str, int]], num_classes: int) -> Tuple[int, str]:
    """(label, '') or (-1, why not) for one streamed sample."""
    members = ref.members or {}
    value = None
    if label_key in members:
        value = members[label_key].decode("utf-8", "replace").strip()
    elif "json" in members:
        try:
            value = json.loads(members["json"]).get(label_key)
        except (ValueError, AttributeError):
            return -1, f"{ref.id}: its .json member is not a JSON object, and it has no {label_key!r} member"
    if value is None or value == "":
        return -1, (f"{ref.id}: no label (no {label_key!r} member or .json field; it has "
                    f"{', '.join(sorted(members)) or 'no other members'}): name the label with `label_key`")
    if isinstance(value, (int, np.integer)) or (isinstance(value, str) and value.lstrip("-").isdigit()):
        label = int(value)
        if not 0 <= label < num_classes:
            return -1, f"{ref.id}: label {label} is not a class index of this {num_classes}-class model"
        return label, ""
    if class_index is None:
        return -1, f"{ref.id}: label {value!r} is a name: pass the class names (`classes`) to map names to indices"
    if str(value) not in class_index:
        return -1, f"{ref.id}: label {value!r} is not one of the {len(class_index)} class names given"
    return class_index[str(value)], ""


def _group(src: StreamedSource, shard_ids: Sequence[int], seed: int, epoch: int, stream: int, group: int,
           class_index, num_classes: int) -> List[Tuple[ImageRef, int]]:
    """Every sample of the group's shards, in the group's seeded order, seeded and labelled."""
    found = []
    for k in shard_ids:
        for place, ref in enumerate(stream_tar(src.shards[k])):
            found.append((k * SHARD_STRIDE + place, ref))
    perm = np.random.default_rng([seed, epoch, stream, group, 7]).permutation(len(found))
    out = []
    for p in perm:
        index, ref = found[p]
        label, why = (-1, "") if ref.error else label_of(ref, src.label_key, class_index, num_classes)
        ref = dataclasses.replace(ref, seed=sample_seed(seed, epoch, index), index=index,
                                  error=ref.error or (why or None), members=None)
        out.append((ref, label))
    return out


def stream_samples(src: StreamedSource, stream: int, streams: int, seed: int, shuffle_shards: int,
                   position: Tuple[int, int, int], ahead: int = 1) -> Iterator[Tuple[ImageRef, int, Tuple[int, int, int]]]:
    """Endless (ref, label, position after it) of one stream from `position` = (epoch, group, offset);
    the next group of shards is read in a background thread while one is emitted."""
    class_index = {c: i for i, c in enumerate(src.classes)} if src.classes else None
    num_classes = len(src.classes) if src.classes else int(src.num_classes or 0)
    n = len(src.shards)
    end = object()

    def groups():
        epoch, group, offset = position
        while True:
            mine = epoch_order(n, seed, epoch)[stream::streams]
            for g in range(group, math.ceil(len(mine) / shuffle_shards)):
                ids = [int(k) for k in mine[g * shuffle_shards:(g + 1) * shuffle_shards]]

                def producer(ids=ids, e=epoch, g=g, o=offset):
                    samples = _group(src, ids, seed, e, stream, g, class_index, num_classes)
                    for j, (ref, label) in enumerate(samples[o:]):
                        yield ref, label, (e, g, o + 1 + j)
                    yield end, len(samples), e
                yield producer
                offset = 0
            epoch, group = epoch + 1, 0

    per_epoch = math.ceil(len(range(stream, n, streams)) / shuffle_shards)
    empty = 0  # groups in a row without a sample: more than an epoch's worth means none will come
    for item in prefetch(groups(), ahead=ahead + 1, queue_size=64):
        if item[0] is end:
            empty = empty + 1 if item[1] == 0 else 0
            if empty > per_epoch:
                raise ValueError(f"stream {stream} of {streams} found no samples in its shards for a whole epoch: "
                                 f"its shards are empty or unreadable")
            continue
        yield item


def streamed_train_batches(src: StreamedSource, batch_size: int, seed: int, streams: int, shuffle_shards: int,
                           positions: np.ndarray, decoder, image_shape, process: int, processes: int
                           ) -> Iterator[TrainBatch]:
    """Endless TrainBatch-es of this process's rows (its streams' rows) of every global batch, from
    `positions` ((streams, 3): each stream's (epoch, group, offset)). Each batch carries
    `positions`: every one of this process's streams' position after the batch."""
    check_streams(streams, len(src.shards), batch_size, processes)
    per = streams // processes
    mine = range(process * per, (process + 1) * per)
    rows = batch_size // streams
    its = {s: stream_samples(src, s, streams, seed, shuffle_shards, tuple(int(v) for v in positions[s]))
           for s in mine}
    pos = {s: tuple(int(v) for v in positions[s]) for s in mine}
    step_positions: List[Dict[int, Tuple[int, int, int]]] = []
    step_labels: List[np.ndarray] = []

    def refs():
        while True:  # a whole step's samples first, so its positions are known before its batch is built
            items = [(s, next(its[s])) for s in mine for _ in range(rows)]
            for s, (_, _, p) in items:
                pos[s] = p
            step_positions.append(dict(pos))
            step_labels.append(np.asarray([label for _, (_, label, _) in items], np.int64))
            for _, (ref, _, _) in items:
                yield ref

    for hb in stream_batches(refs(), per * rows, decoder, image_shape):
        after, labels = step_positions.pop(0), step_labels.pop(0)
        seeds = np.asarray([r.seed for r in hb.refs], np.int32)
        errors = [(r.id, why) for r in hb.refs for i, why in hb.errors if r.index == i]
        weights = hb.valid.astype(np.float32) * (labels >= 0)
        yield TrainBatch(hb.images, np.maximum(labels, 0).astype(np.int32), weights, seeds,
                         min(after[s][0] for s in mine), errors, np.asarray([after[s] for s in mine], np.int64))
