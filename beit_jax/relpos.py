"""Relative position bias helpers for BEiT, as pure numpy (usable at trace time and in converters).

The index and the table resize follow timm's `gen_relative_position_index` and
`resize_rel_pos_bias_table` (itself from microsoft/unilm), so a table resized here equals timm's.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np

NUM_EXTRA_TOKENS = 3  # cls->token, token->cls, cls->cls


def num_relative_distance(window_size: Tuple[int, int]) -> int:
    """Rows of a BEiT relative position bias table for a (Wh, Ww) patch grid."""
    return (2 * window_size[0] - 1) * (2 * window_size[1] - 1) + NUM_EXTRA_TOKENS


def gen_relative_position_index(window_size: Tuple[int, int]) -> np.ndarray:
    """Index into the bias table for every (query, key) pair, cls token first.

    Returns an int32 array of shape (Wh*Ww + 1, Wh*Ww + 1).
    """
    wh, ww = window_size
    area = wh * ww
    num_rel = num_relative_distance(window_size)
    coords = np.stack(np.meshgrid(np.arange(wh), np.arange(ww), indexing="ij")).reshape(2, -1)
    rel = coords[:, :, None] - coords[:, None, :]  # 2, area, area
    rel = rel.transpose(1, 2, 0).copy()
    rel[:, :, 0] += wh - 1
    rel[:, :, 1] += ww - 1
    rel[:, :, 0] *= 2 * ww - 1
    index = np.zeros((area + 1, area + 1), dtype=np.int32)
    index[1:, 1:] = rel.sum(-1)
    index[0, 0:] = num_rel - 3
    index[0:, 0] = num_rel - 2
    index[0, 0] = num_rel - 1
    return index


def _geometric_offsets(src: int, dst: int) -> list[float]:
    """unilm's non-uniform source coordinates: a geometric progression spanning the target range."""

    def geometric_progression(a, r, n):
        return a * (1.0 - r ** n) / (1.0 - r)

    left, right = 1.01, 1.5
    q = left
    while right - left > 1e-6:
        q = (left + right) / 2.0
        if geometric_progression(1, q, src // 2) > dst // 2:
            right = q
        else:
            left = q
    dis = []
    cur = 1.0
    for i in range(src // 2):
        dis.append(cur)
        cur += q ** (i + 1)
    return [-d for d in reversed(dis)] + [0.0] + dis


def _interp_linear_1d_weights(points: np.ndarray, x: np.ndarray):
    """Left/right indices and distances exactly as timm's RegularGridInterpolator (torch.bucketize)."""
    n = points.shape[0]
    idx_right = np.searchsorted(points, x, side="left")
    idx_right = np.minimum(idx_right, n - 1)
    idx_left = np.clip(idx_right - 1, 0, n - 1)
    dist_left = np.maximum(x - points[idx_left], 0).astype(np.float32)
    dist_right = np.maximum(points[idx_right] - x, 0).astype(np.float32)
    both_zero = (dist_left == 0) & (dist_right == 0)
    dist_left[both_zero] = 1.0
    dist_right[both_zero] = 1.0
    return idx_left, idx_right, dist_left, dist_right


def resize_rel_pos_bias_table(
    table: np.ndarray,
    new_window_size: Tuple[int, int],
    old_window_size: Tuple[int, int] | None = None,
) -> np.ndarray:
    """Resize a flat (num_rel, num_heads) BEiT bias table to a new patch grid.

    Same result as timm's `resize_rel_pos_bias_table` (the default, scipy-free, path): the
    (2Wh-1, 2Ww-1) grid of each head is resampled linearly from geometrically spaced source
    positions; the 3 cls entries are kept. The source window is assumed square when not given.
    """
    table = np.asarray(table)
    dst_size = (new_window_size[0] * 2 - 1, new_window_size[1] * 2 - 1)
    dst_num_pos = dst_size[0] * dst_size[1] + NUM_EXTRA_TOKENS
    src_num_pos, num_heads = table.shape
    if old_window_size is not None:
        src_size = (old_window_size[0] * 2 - 1, old_window_size[1] * 2 - 1)
    else:
        n = src_num_pos - NUM_EXTRA_TOKENS
        side = int(n ** 0.5)
        if side * side == n:
            src_size = (side, side)
        elif n == dst_size[0] * dst_size[1]:
            src_size = dst_size
        else:
            raise ValueError(
                f"cannot infer a square source window for a relative position bias table with "
                f"{src_num_pos} rows; pass old_window_size")
    if src_size == dst_size:
        return table
    orig_dtype = table.dtype
    extra = table[-NUM_EXTRA_TOKENS:]
    grid = table[:-NUM_EXTRA_TOKENS].astype(np.float32)

    ys = np.asarray(_geometric_offsets(src_size[0], dst_size[0]), dtype=np.float32)
    xs = np.asarray(_geometric_offsets(src_size[1], dst_size[1]), dtype=np.float32)
    ty, tx = dst_size[0] // 2.0, dst_size[1] // 2.0
    dy = np.arange(-ty, ty + 0.1, 1.0, dtype=np.float32)
    dx = np.arange(-tx, tx + 0.1, 1.0, dtype=np.float32)
    gy, gx = np.meshgrid(dy, dx, indexing="ij")
    yl, yr, dyl, dyr = _interp_linear_1d_weights(ys, gy)
    xl, xr, dxl, dxr = _interp_linear_1d_weights(xs, gx)
    denom = (dyl + dyr) * (dxl + dxr)

    z = grid.reshape(src_size[0], src_size[1], num_heads)  # per-head planes, heads last
    # Same summation order as timm: (0,0), (0,1), (1,0), (1,1) corners.
    out = z[yl, xl] * (dyr * dxr)[..., None]
    out = out + z[yl, xr] * (dyr * dxl)[..., None]
    out = out + z[yr, xl] * (dyl * dxr)[..., None]
    out = out + z[yr, xr] * (dyl * dxl)[..., None]
    out = out / denom[..., None]
    out = out.reshape(-1, num_heads)
    assert out.shape[0] + NUM_EXTRA_TOKENS == dst_num_pos
    return np.concatenate([out, extra.astype(np.float32)], axis=0).astype(orig_dtype)


def resample_abs_pos_embed(
    pos_embed: np.ndarray,
    new_size: Sequence[int],
    old_size: Sequence[int] | None = None,
    num_prefix_tokens: int = 1,
) -> np.ndarray:
    """Resample a (1, prefix + H*W, D) absolute position embedding to a new grid (bicubic).

    Uses antialiased bicubic (Keys a=-0.5, half-pixel centres) like timm's
    `resample_abs_pos_embed(..., antialias=True)`; prefix (cls) embeddings are kept.
    """
    import jax
    import jax.numpy as jnp

    pos_embed = np.asarray(pos_embed)
    new_size = tuple(int(s) for s in new_size)
    num_pos = pos_embed.shape[1] - num_prefix_tokens
    if old_size is None:
        side = int(num_pos ** 0.5)
        old_size = (side, side)
    old_size = tuple(old_size)
    if old_size == new_size:
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = grid.shape[-1]
    grid = grid.reshape(1, old_size[0], old_size[1], dim).astype(np.float32)
    resized = jax.image.resize(jnp.asarray(grid), (1, *new_size, dim), method="bicubic", antialias=True)
    resized = np.asarray(resized).reshape(1, -1, dim).astype(pos_embed.dtype)
    return np.concatenate([prefix, resized], axis=1)
