"""Array helpers with no model knowledge."""
from __future__ import annotations

import numpy as np


def to_numpy(value) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach"):  # a torch tensor (only when the caller already has torch)
        value = value.detach().cpu()
        if not value.dtype.is_floating_point or value.dtype.itemsize >= 4:
            return value.numpy()
        return value.float().numpy()
    return np.asarray(value)


def transposed_copy(value: np.ndarray, axes=None) -> np.ndarray:
    """A C-contiguous copy of `value.transpose(axes)`. A 2-D matrix is copied in 64x64 tiles:
    numpy's element-strided copy of a transposed 4096x1024 float32 matrix runs 2-4x slower (every
    read a cache miss), seconds for a large model's checkpoint."""
    view = value.transpose(axes)
    if value.ndim != 2 or value.size < 1 << 16:
        return np.ascontiguousarray(view)
    out = np.empty(view.shape, value.dtype)
    rows, cols = value.shape
    for i in range(0, rows, 64):
        for j in range(0, cols, 64):
            out[j:j + 64, i:i + 64] = value[i:i + 64, j:j + 64].T
    return out
