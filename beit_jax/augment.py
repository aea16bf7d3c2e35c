"""Training-time augmentation (timm's defaults for the train transform), without torch.

RandomResizedCrop(scale=(0.08, 1), ratio=(3/4, 4/3)) with torchvision's sampling rule, then a
horizontal flip with p=0.5. Randomness comes from a per-sample integer seed (the data pipeline
derives it from the run seed, epoch and index), so a resumed run sees the same crops.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from .transforms import _INTERPOLATION, _pair, normalize, to_uint8_array


def random_resized_crop_params(width: int, height: int, rng: np.random.Generator,
                               scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> Tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params: (top, left, h, w)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height  # fallback: central crop
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class TrainTransform:
    """PIL image + seed -> augmented (H, W, 3) uint8 (crop_uint8) or normalized float32 (__call__)."""

    def __init__(self, input_size, interpolation="bicubic", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                 scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip: float = 0.5, **_ignored):
        self.size = _pair(input_size)
        self.interpolation = interpolation
        self.mean, self.std = tuple(mean), tuple(std)
        self.scale, self.ratio, self.hflip = tuple(scale), tuple(ratio), hflip

    def crop_uint8(self, img: Image.Image, seed: Optional[int] = None) -> np.ndarray:
        rng = np.random.default_rng(seed)
        top, left, h, w = random_resized_crop_params(img.width, img.height, rng, self.scale, self.ratio)
        img = img.resize((self.size[1], self.size[0]), _INTERPOLATION[self.interpolation],
                         box=(left, top, left + w, top + h))
        if rng.uniform() < self.hflip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return to_uint8_array(img)

    def __call__(self, img: Image.Image, seed: Optional[int] = None) -> np.ndarray:
        return normalize(self.crop_uint8(img, seed), self.mean, self.std)
