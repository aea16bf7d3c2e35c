"""Segmenting whole images with a `BeitSegmenter`: the inference modes of mmseg and transformers.

- `whole` (transformers' image processor and post-processing): the image squashed to the
  model's size, logits resized back to the image (bilinear), argmax.
- `slide` (mmseg's `slide_inference`, unilm's ADE20K test setting): the image resized so its
  short side is the model's size (aspect kept), then crops of the model's size every `stride`
  pixels (default 2/3 of the crop, unilm's 426 for 640) whose logits, upsampled to the crop,
  are summed and divided by how many crops cover each pixel; a side shorter than the crop is
  padded (the pad is cut off again).
- `flip`: the logits of the mirrored image, mirrored back, are added (mmseg's flip test).

Label maps are the model's class indices (transformers' `id2label` keys); for the ADE20K
checkpoints index i is ADE20K class i + 1 (they were trained with reduce_labels). PNGs are
palette images ('P' mode), readable by any tool, with `palette()`'s colours.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

MODES = ("whole", "slide")
SEG_MEAN = SEG_STD = (0.5, 0.5, 0.5)  # BeitImageProcessor's for the ADE20K checkpoints


def palette(n: int = 256) -> np.ndarray:
    """(n, 3) uint8 colours: PASCAL VOC's bit-interleaved palette (0 is black; neighbours differ)."""
    out = np.zeros((n, 3), np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out[i] = (r, g, b)
    return out


@functools.lru_cache(maxsize=8)
def _logits_fn(model):
    return jax.jit(lambda v, x: model.apply(v, x).astype(jnp.float32))


def _normalise(rgb: np.ndarray, mean, std) -> np.ndarray:
    return ((rgb.astype(np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32))


def _upsample(logits: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """(h, w, K) -> (H, W, K), bilinear with half-pixel centres (torch's align_corners=False)."""
    return np.asarray(jax.image.resize(jnp.asarray(logits), (*size, logits.shape[-1]), "bilinear", antialias=False))


def crop_boxes(h: int, w: int, crop: int, stride: int) -> Sequence[Tuple[int, int, int, int]]:
    """mmseg's slide grid: (y1, x1, y2, x2) crops of at most crop x crop covering an h x w image."""
    rows = max(h - crop + stride - 1, 0) // stride + 1
    cols = max(w - crop + stride - 1, 0) // stride + 1
    boxes = []
    for i in range(rows):
        for j in range(cols):
            y2, x2 = min(i * stride + crop, h), min(j * stride + crop, w)
            boxes.append((max(y2 - crop, 0), max(x2 - crop, 0), y2, x2))
    return boxes


def segment_logits(model, variables, image, mode: str = "whole", stride: Optional[int] = None, flip: bool = False,
                   mean=SEG_MEAN, std=SEG_STD, batch_size: int = 8) -> np.ndarray:
    """(H, W, classes) float32 logits for one image (a PIL image or an (H, W, 3) uint8 array) at its
    own size, by `mode` (see the module docstring)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)} (got {mode!r})")
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))
    img = img.convert("RGB")
    size = model.config.image_size
    fn = _logits_fn(model)
    if mode == "whole":
        x = _normalise(np.asarray(img.resize((size, size), Image.BILINEAR)), mean, std)[None]
        xs = np.concatenate([x, x[:, :, ::-1]]) if flip else x
        out = np.asarray(fn(variables, xs))
        logits = out[0] + (out[1][:, ::-1] if flip else 0)
        return _upsample(logits, (img.height, img.width))
    stride = stride or max(1, (2 * size) // 3)
    if not 0 < stride <= size:
        raise ValueError(f"stride must be between 1 and the crop size {size} (got {stride})")
    scale = size / min(img.size)
    resized = img.resize((max(size, round(img.width * scale)), max(size, round(img.height * scale))), Image.BILINEAR)
    x = _normalise(np.asarray(resized), mean, std)
    h, w = x.shape[:2]
    boxes = crop_boxes(h, w, size, stride)
    crops = []
    for y1, x1, y2, x2 in boxes:
        c = np.zeros((size, size, 3), np.float32)  # a short side is padded (0 = the mean colour)
        c[: y2 - y1, : x2 - x1] = x[y1:y2, x1:x2]
        crops.append(c)
    crops = np.stack(crops)
    if flip:
        crops = np.concatenate([crops, crops[:, :, ::-1]])
    outs = np.concatenate([np.asarray(fn(variables, crops[i:i + batch_size])) for i in range(0, len(crops), batch_size)])
    k = outs.shape[-1]
    total, count = np.zeros((h, w, k), np.float32), np.zeros((h, w, 1), np.float32)
    for n, (y1, x1, y2, x2) in enumerate(boxes):
        crop_logits = _upsample(outs[n], (size, size))
        if flip:
            crop_logits = crop_logits + _upsample(outs[len(boxes) + n], (size, size))[:, ::-1]
        total[y1:y2, x1:x2] += crop_logits[: y2 - y1, : x2 - x1]
        count[y1:y2, x1:x2] += 1
    return _upsample(total / count, (img.height, img.width))


def segment(model, variables, image, **kwargs) -> np.ndarray:
    """(H, W) int32 class indices for one image (see segment_logits for the arguments)."""
    return segment_logits(model, variables, image, **kwargs).argmax(-1).astype(np.int32)


def label_png(labels: np.ndarray) -> Image.Image:
    """A palette PNG of class indices (up to 256 classes: index = pixel value)."""
    if labels.max(initial=0) > 255:
        raise ValueError(f"class index {int(labels.max())} does not fit a palette PNG (256 classes at most)")
    out = Image.fromarray(labels.astype(np.uint8), mode="P")
    out.putpalette(palette().reshape(-1).tolist())
    return out


def overlay(image, labels: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """The image with each pixel's class colour blended in."""
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, np.float32)
    colours = palette()[labels].astype(np.float32)
    return Image.fromarray(np.clip((1 - alpha) * rgb + alpha * colours, 0, 255).astype(np.uint8))


__all__ = ["MODES", "crop_boxes", "label_png", "overlay", "palette", "segment", "segment_logits"]
