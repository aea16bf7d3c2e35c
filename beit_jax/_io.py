"""Atomic local file writes: a reader (or a resumed run) sees the old file or the whole new one,
never half, also after a power loss (the file and then its folder are fsynced)."""
from __future__ import annotations

import os
from typing import BinaryIO, Callable, Union

# Temp files carry this in their name, so a writer can tell its own leftovers from a user's files.
TEMP_MARKER = ".beit-jax-tmp-"


def temp_name(path: str) -> str:
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}{TEMP_MARKER}{os.getpid()}")


def fsync_dir(folder: str) -> None:
    """Make a rename in `folder` durable (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Union[str, os.PathLike], data: Union[bytes, str, Callable[[BinaryIO], None]]) -> None:
    """Write bytes/str, or call data(file) to write, into a hidden temp file beside `path`, fsync it,
    rename it over `path`, and fsync the folder."""
    path = os.fspath(path)
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(os.path.dirname(path))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
