"""Image sources (folder tree, list file, tar shards), parallel decode, fixed-shape host batches.

Workers return resized+cropped uint8 images (4x less to move than float32); normalization runs
inside the jitted forward on the device. A failed decode never stops the stream: its slot is
masked and the error travels with the batch.
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import glob
import multiprocessing
import os
import tarfile
from collections import deque
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from .transforms import EvalTransform, ImageLoadError, load_image

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                              ".ppm", ".pgm", ".pbm", ".pnm"})
LIST_EXTENSIONS = frozenset({".txt", ".lst", ".list"})


@dataclasses.dataclass(frozen=True)
class ImageRef:
    """One input: `id` is what the outputs report (a path, or 'shard.tar/member')."""
    id: str
    path: str
    offset: int = -1  # tar member data offset; -1: the whole file
    size: int = -1
    seed: int = -1  # per-sample augmentation seed (training); -1: deterministic transform

    def read_bytes(self) -> bytes:
        with open(self.path, "rb") as f:
            if self.offset < 0:
                return f.read()
            f.seek(self.offset)
            return f.read(self.size)


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _walk(root: str) -> List[ImageRef]:
    refs = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        refs.extend(ImageRef(p, p) for p in (os.path.join(dirpath, f) for f in sorted(filenames)) if _is_image(p))
    return refs


def _tar_members(path: str) -> List[ImageRef]:
    refs = []
    try:
        with tarfile.open(path, "r:") as tf:  # uncompressed: members are read in place by offset
            for m in tf:
                if m.isfile() and _is_image(m.name):
                    refs.append(ImageRef(f"{path}/{m.name}", path, m.offset_data, m.size))
    except tarfile.ReadError as e:
        raise ValueError(f"{path}: not an uncompressed tar file ({e}); tar shards must be plain .tar") from e
    return refs


def _read_list(path: str) -> List[ImageRef]:
    base = os.path.dirname(os.path.abspath(path))
    refs = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            p = line if os.path.isabs(line) else os.path.join(base, line)
            refs.append(ImageRef(line, p))
    return refs


def list_images(src: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]) -> List[ImageRef]:
    """Every input of SRC, in a deterministic order.

    SRC: a folder (recursive, common image extensions, sorted), a text file listing one path per
    line (relative to the file; '#' comments), a .tar shard (its image members in tar order), a
    glob of those ('shards/*.tar'), an image file, or a list of any of these.
    """
    if isinstance(src, (list, tuple)):
        return [r for s in src for r in list_images(s)]
    src = os.fspath(src)
    if any(c in src for c in "*?[") and not os.path.exists(src):
        matches = sorted(glob.glob(src))
        if not matches:
            raise FileNotFoundError(f"no files match {src}")
        return list_images(matches)
    if os.path.isdir(src):
        return _walk(src)
    if not os.path.exists(src):
        raise FileNotFoundError(f"input not found: {src}")
    ext = os.path.splitext(src)[1].lower()
    if ext == ".tar":
        return _tar_members(src)
    if ext in LIST_EXTENSIONS:
        return _read_list(src)
    if _is_image(src):
        return [ImageRef(src, src)]
    raise ValueError(f"{src}: not a folder, .tar shard, list file ({', '.join(sorted(LIST_EXTENSIONS))}) or image")


def list_image_folder(root: Union[str, os.PathLike]) -> Tuple[List[ImageRef], np.ndarray, List[str]]:
    """An ImageFolder layout (one sub-folder per class): (refs, int labels, sorted class names)."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder not found: {root}")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not classes:
        raise ValueError(f"{root}: no class sub-folders (expected ROOT/CLASS/IMAGE files)")
    refs, labels = [], []
    for label, name in enumerate(classes):
        found = _walk(os.path.join(root, name))
        refs.extend(found)
        labels.extend([label] * len(found))
    return refs, np.asarray(labels, np.int32), classes


def decode(ref: ImageRef, transform: EvalTransform) -> Tuple[Optional[np.ndarray], Optional[str]]:
    """(uint8 (H, W, 3) crop, None) or (None, reason). Never raises for a bad input."""
    try:
        data = ref.read_bytes() if ref.offset >= 0 else ref.path
        img = load_image(data, name=ref.id)
        return (transform.crop_uint8(img, ref.seed) if ref.seed >= 0 else transform.crop_uint8(img)), None
    except ImageLoadError as e:
        return None, str(e)
    except Exception as e:  # a decoder bug or an I/O error must not end a million-image run
        return None, f"cannot read image {ref.id}: {type(e).__name__}: {e}"


def _decode_many(refs: Sequence[ImageRef], transform: EvalTransform):
    return [decode(r, transform) for r in refs]


class Decoder:
    """Ordered, bounded parallel decode: `imap(refs)` yields decode() results in input order.

    backend 'thread' (PIL releases the GIL while decoding and resizing), 'process' (spawned
    workers, no GIL at all) or workers=0 for inline decoding. At most `window` images are in
    flight, so memory is bounded whatever the dataset size.
    """

    def __init__(self, transform: EvalTransform, workers: int = 2, backend: str = "thread",
                 window: int = 64, chunk: int = 4):
        if backend not in ("thread", "process"):
            raise ValueError(f"backend must be 'thread' or 'process' (got {backend!r})")
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
                yield decode(r, self.transform)
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
                pending.append(self._pool.submit(_decode_many, group, self.transform))
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
    """A fixed-shape batch: padded slots have index -1 and valid False."""
    indices: np.ndarray  # (B,) int64 global input indices
    images: np.ndarray  # (B, H, W, 3) uint8
    valid: np.ndarray  # (B,) bool
    errors: List[Tuple[int, str]]  # (global index, reason) of inputs that failed to decode


def batches(refs: Sequence[ImageRef], slots: Sequence[int], batch_size: int, decoder: Decoder,
            image_shape: Tuple[int, int, int]) -> Iterator[HostBatch]:
    """Fixed-shape batches over `slots`: global indices into refs, -1 for a padding slot.

    One decode stream runs across batch boundaries, so workers never idle between batches. A
    trailing partial batch is padded and masked.
    """
    slots = list(slots)
    decoded = decoder.imap(refs[i] for i in slots if i >= 0)
    for start in range(0, len(slots), batch_size):
        idx = np.full((batch_size,), -1, np.int64)
        images = np.zeros((batch_size, *image_shape), np.uint8)
        valid = np.zeros((batch_size,), bool)
        errors = []
        for slot, gi in enumerate(slots[start:start + batch_size]):
            if gi < 0:
                continue
            arr, err = next(decoded)
            idx[slot] = gi
            if err is None:
                images[slot] = arr
                valid[slot] = True
            else:
                errors.append((gi, err))
        yield HostBatch(idx, images, valid, errors)
