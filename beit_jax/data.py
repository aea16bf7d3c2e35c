"""Parallel decode of the inputs `sources.py` lists, and fixed-shape host batches.

Workers read (local files, object-store objects, URLs) and decode; they return resized+cropped uint8 images (4x less to move than float32); normalization runs
inside the jitted forward on the device. A failed decode never stops the stream: its slot is
masked and the error travels with the batch.
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import multiprocessing
from collections import deque
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .sources import ImageRef, list_image_folder  # noqa: F401  (list_image_folder: fine-tuning's source)
from .transforms import DECODE_MODES, EvalTransform, ImageLoadError, load_image

PAD = (None, None)  # what the decoder yields for a padding slot (decode never returns it)


def decode(ref: Optional[ImageRef], transform: EvalTransform, fast: bool = False
           ) -> Tuple[Optional[np.ndarray], Optional[str]]:
    """(uint8 (H, W, 3) crop, None) or (None, reason); PAD for a padding slot (ref None). Never raises
    for a bad input. fast: large JPEGs decode at a reduced DCT scale (see load_image's resized_size)."""
    if ref is None:
        return PAD
    if ref.error is not None:
        return None, ref.error
    try:
        img = load_image(ref.read_bytes(), name=ref.id, resized_size=transform.resized_size if fast else None)
        return (transform.crop_uint8(img, ref.seed) if ref.seed >= 0 else transform.crop_uint8(img)), None
    except ImageLoadError as e:
        return None, str(e)
    except Exception as e:  # a decoder bug or an I/O error must not end a million-image run
        return None, f"cannot read image {ref.id}: {type(e).__name__}: {e}"


def _decode_many(refs: Sequence[ImageRef], transform: EvalTransform, fast: bool = False):
    return [decode(r, transform, fast) for r in refs]


class Decoder:
    """Ordered, bounded parallel decode: `imap(refs)` yields decode() results in input order.

    backend 'thread' (PIL releases the GIL while decoding and resizing), 'process' (spawned
    workers, no GIL at all) or workers=0 for inline decoding. At most `window` images are in
    flight, so memory is bounded whatever the dataset size. decode: 'exact' (timm's pixels) or
    'fast' (large JPEGs decoded at a reduced DCT scale first; eval transforms only).
    """

    def __init__(self, transform: EvalTransform, workers: int = 2, backend: str = "thread",
                 window: int = 64, chunk: int = 4, decode: str = "exact"):
        if backend not in ("thread", "process"):
            raise ValueError(f"backend must be 'thread' or 'process' (got {backend!r})")
        if decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {', '.join(DECODE_MODES)} (got {decode!r})")
        if decode == "fast" and not hasattr(transform, "resized_size"):
            raise ValueError("decode='fast' needs an eval transform (it decodes JPEGs at the size the resize needs)")
        self.fast = decode == "fast"
        self.transform, self.workers, self.backend = transform, workers, backend
        self.window, self.chunk = max(window, 1), max(chunk, 1)
        self._pool: Optional[cf.Executor] = None

    def __enter__(self):
        if self.workers > 0:
            if self.backend == "thread":
                self._pool = cf.ThreadPoolExecutor(self.workers, thread_name_prefix="beit-decode")
            else:
                self._pool = cf.ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
        return self

    def __exit__(self, *exc):
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def imap(self, refs: Iterable[ImageRef]) -> Iterator[Tuple[Optional[np.ndarray], Optional[str]]]:
        if self._pool is None:
            for r in refs:
                yield decode(r, self.transform, self.fast)
            return
        it = iter(refs)
        pending: deque = deque()

        def submit() -> bool:
            group = []
            for r in it:
                group.append(r)
                if len(group) == self.chunk:
                    break
            if group:
                pending.append(self._pool.submit(_decode_many, group, self.transform, self.fast))
            return bool(group)

        for _ in range(max(1, self.window // self.chunk)):
            if not submit():
                break
        while pending:
            results = pending.popleft().result()
            submit()
            yield from results


@dataclasses.dataclass
class HostBatch:
    """A fixed-shape batch: padded slots have index -1, valid False and ref None."""
    indices: np.ndarray  # (B,) int64: each slot's ref.index (-1: padding)
    images: np.ndarray  # (B, H, W, 3) uint8
    valid: np.ndarray  # (B,) bool
    errors: List[Tuple[int, str]]  # (index, reason) of inputs that failed to decode
    refs: List[Optional[ImageRef]]  # the ref of each slot

    @classmethod
    def empty(cls, batch_size: int, image_shape: Tuple[int, int, int]) -> "HostBatch":
        return cls(np.full((batch_size,), -1, np.int64), np.zeros((batch_size, *image_shape), np.uint8),
                   np.zeros((batch_size,), bool), [], [None] * batch_size)


def stream_batches(refs: Iterable[Optional[ImageRef]], batch_size: int, decoder: Decoder,
                   image_shape: Tuple[int, int, int]) -> Iterator[HostBatch]:
    """Fixed-shape batches over a stream of refs of any (unknown) length, in order; None in the stream
    is a padding slot (so every process can step through the same number of batches). Indices are
    the refs' `index`. One decode stream runs across batch boundaries, so workers never idle between
    batches; the last batch is padded and masked.

    The one batch builder: extraction (refs of its units) and fine-tuning (seeded training refs,
    padded validation rows) both use it.
    """
    pulled: deque = deque()

    def tap():
        for r in refs:
            pulled.append(r)
            yield r

    decoded = decoder.imap(tap())
    while True:
        hb = HostBatch.empty(batch_size, image_shape)
        n = 0
        for slot, (arr, err) in zip(range(batch_size), decoded):
            ref = pulled.popleft()
            n += 1
            if ref is None:
                continue
            hb.indices[slot], hb.refs[slot] = ref.index, ref
            if err is None:
                hb.images[slot], hb.valid[slot] = arr, True
            else:
                hb.errors.append((ref.index, err))
        if n == 0:
            return
        yield hb
        if n < batch_size:
            return
