"""Atomic file writes: a reader (or a resumed run) sees the old file or the whole new one, never half."""
from __future__ import annotations

import os
from typing import BinaryIO, Callable, Union


def atomic_write(path: Union[str, os.PathLike], data: Union[bytes, str, Callable[[BinaryIO], None]]) -> None:
    """Write bytes/str, or call data(file) to write, into a hidden temp file beside `path`, fsync it,
    then rename it over `path`. Temp names contain '.tmp-' so leftovers of a killed writer are easy
    to find."""
    path = os.fspath(path)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
