"""Training augmentation as timm makes it, without torch: the random choices and the pixel ops.

Random choices (which crop, which RandAugment ops and magnitudes, which erasing box, which
mixup lambda or cutmix box) draw from an explicit random generator: a `np.random.Generator` that
the data pipeline seeds per sample (or per global batch), so a resumed run, or the same run on
another number of hosts, sees the same augmentation. Each rule draws the same random quantities
in the same order as timm's, so fed with timm's random stream it makes timm's choices (the tests
do exactly that). A generator only needs `random()`, `uniform(a, b)`, `normal(mu, sigma)`,
`integers(lo, hi)` (hi exclusive), `choice(n, size)` and `beta(a, b)`.

Pixel ops:
  * RandAugment (timm.data.auto_augment, `rand-...` policies): PIL ops on the PIL image, the same
    calls with the same arguments as timm's, so the same pixels;
  * random erasing and mixup/cutmix act on normalized float batches after the PIL stage; they are
    written against an array namespace `xp` (numpy, or jax.numpy inside the jitted train step,
    where the global batch lives: mixup pairs row i with row B-1-i of the *global* batch).

Follows timm's auto_augment.py, random_erasing.py and mixup.py (Apache-2.0). Imports nothing
from beit_jax: transforms.py composes these pieces into the train transform.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

LEVEL_DENOM = 10.0  # timm's _LEVEL_DENOM: magnitude M means level M / 10 of an op's range
FILL = (128, 128, 128)


# ---- RandomResizedCrop ------------------------------------------------------------------------
def random_resized_crop_params(width: int, height: int, rng, scale=(0.08, 1.0),
                               ratio=(3 / 4, 4 / 3)) -> Tuple[int, int, int, int]:
    """torchvision's / timm's RandomResizedCrop.get_params: (top, left, h, w)."""
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


# ---- RandAugment: pixel ops ---------------------------------------------------------------------
def _affine(img: Image.Image, matrix, fill, resample) -> Image.Image:
    return img.transform(img.size, Image.AFFINE, matrix, resample=resample, fillcolor=fill)


def _solarize_add(img: Image.Image, add: int, thresh: int = 128) -> Image.Image:
    lut = [min(255, i + add) if i < thresh else i for i in range(256)]
    if img.mode not in ("L", "RGB"):
        return img
    return img.point(lut * 3 if img.mode == "RGB" else lut)


def _posterize_op(img: Image.Image, bits: int) -> Image.Image:
    if bits >= 8:
        return img
    if bits <= 0:  # keep no bit: black. (Pillow < 11 did this; Pillow >= 11 raises, and so does timm then)
        return img.point([0] * 256 * len(img.getbands()))
    return ImageOps.posterize(img, bits)


# Each op: (img, *args, fill, resample) -> img. Arguments come from the level functions below.
_OPS: Dict[str, Callable[..., Image.Image]] = {
    "AutoContrast": lambda img, **_: ImageOps.autocontrast(img),
    "Equalize": lambda img, **_: ImageOps.equalize(img),
    "Invert": lambda img, **_: ImageOps.invert(img),
    "Rotate": lambda img, degrees, fill, resample: img.rotate(degrees, resample=resample, fillcolor=fill),
    "Posterize": lambda img, bits, **_: _posterize_op(img, bits),
    "Solarize": lambda img, thresh, **_: ImageOps.solarize(img, thresh),
    "SolarizeAdd": lambda img, add, **_: _solarize_add(img, add),
    "Color": lambda img, factor, **_: ImageEnhance.Color(img).enhance(factor),
    "Contrast": lambda img, factor, **_: ImageEnhance.Contrast(img).enhance(factor),
    "Brightness": lambda img, factor, **_: ImageEnhance.Brightness(img).enhance(factor),
    "Sharpness": lambda img, factor, **_: ImageEnhance.Sharpness(img).enhance(factor),
    "ShearX": lambda img, factor, fill, resample: _affine(img, (1, factor, 0, 0, 1, 0), fill, resample),
    "ShearY": lambda img, factor, fill, resample: _affine(img, (1, 0, 0, factor, 1, 0), fill, resample),
    "TranslateXRel": lambda img, pct, fill, resample: _affine(img, (1, 0, pct * img.size[0], 0, 1, 0), fill, resample),
    "TranslateYRel": lambda img, pct, fill, resample: _affine(img, (1, 0, 0, 0, 1, pct * img.size[1]), fill, resample),
}


# ---- RandAugment: magnitude -> op argument (timm's level functions) ----------------------------
def _signed(v: float, negate: bool) -> float:
    return -v if negate else v


def _enhance(level, negate, hp):  # range [0.1, 1.9]
    return (level / LEVEL_DENOM) * 1.8 + 0.1


def _enhance_increasing(level, negate, hp):  # 1.0 is no change; moves towards 0.1 or 1.9
    return max(0.1, 1.0 + _signed((level / LEVEL_DENOM) * 0.9, negate))


def _posterize(level, negate, hp):  # keep 0..4 bits, fewer = stronger at lower levels
    return int((level / LEVEL_DENOM) * 4)


def _solarize(level, negate, hp):
    return min(256, int((level / LEVEL_DENOM) * 256))


# name -> (pixel op, level function or None, whether the level function draws a random sign)
_LEVELS: Dict[str, Tuple[str, Optional[Callable], bool]] = {
    "AutoContrast": ("AutoContrast", None, False),
    "Equalize": ("Equalize", None, False),
    "Invert": ("Invert", None, False),
    "Rotate": ("Rotate", lambda m, neg, hp: _signed((m / LEVEL_DENOM) * 30.0, neg), True),
    "Posterize": ("Posterize", _posterize, False),
    "PosterizeIncreasing": ("Posterize", lambda m, neg, hp: 4 - _posterize(m, neg, hp), False),
    "Solarize": ("Solarize", _solarize, False),
    "SolarizeIncreasing": ("Solarize", lambda m, neg, hp: 256 - _solarize(m, neg, hp), False),
    "SolarizeAdd": ("SolarizeAdd", lambda m, neg, hp: min(128, int((m / LEVEL_DENOM) * 110)), False),
    "Color": ("Color", _enhance, False),
    "ColorIncreasing": ("Color", _enhance_increasing, True),
    "Contrast": ("Contrast", _enhance, False),
    "ContrastIncreasing": ("Contrast", _enhance_increasing, True),
    "Brightness": ("Brightness", _enhance, False),
    "BrightnessIncreasing": ("Brightness", _enhance_increasing, True),
    "Sharpness": ("Sharpness", _enhance, False),
    "SharpnessIncreasing": ("Sharpness", _enhance_increasing, True),
    "ShearX": ("ShearX", lambda m, neg, hp: _signed((m / LEVEL_DENOM) * 0.3, neg), True),
    "ShearY": ("ShearY", lambda m, neg, hp: _signed((m / LEVEL_DENOM) * 0.3, neg), True),
    "TranslateXRel": ("TranslateXRel", lambda m, neg, hp: _signed((m / LEVEL_DENOM) * hp["translate_pct"], neg), True),
    "TranslateYRel": ("TranslateYRel", lambda m, neg, hp: _signed((m / LEVEL_DENOM) * hp["translate_pct"], neg), True),
}

# timm's _RAND_TRANSFORMS / _RAND_INCREASING_TRANSFORMS (same order: the op choice indexes them)
RAND_TRANSFORMS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
                   "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel",
                   "TranslateYRel")
RAND_INCREASING_TRANSFORMS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
                              "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
                              "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
                              "TranslateXRel", "TranslateYRel")


def op_argument(name: str, magnitude: float, negate: bool = False, translate_pct: float = 0.45):
    """The argument timm's level function gives op `name` at `magnitude` (None for AutoContrast,
    Equalize, Invert); `negate` is the sign timm draws for the signed ops."""
    _, level_fn, _ = _LEVELS[name]
    return None if level_fn is None else level_fn(magnitude, negate, {"translate_pct": translate_pct})


def apply_op(img: Image.Image, name: str, magnitude: float, negate: bool = False, *, fill=FILL,
             resample=Image.BICUBIC, translate_pct: float = 0.45) -> Image.Image:
    """RandAugment op `name` at a fixed magnitude (0..10) and sign: the pixels timm's op gives."""
    if name not in _LEVELS:
        raise ValueError(f"unknown RandAugment op {name!r}; known: {sorted(_LEVELS)}")
    op_name = _LEVELS[name][0]
    arg = op_argument(name, magnitude, negate, translate_pct)
    args = () if arg is None else (arg,)
    return _OPS[op_name](img, *args, fill=tuple(fill), resample=resample)


@dataclasses.dataclass(frozen=True)
class RandAugment:
    """timm's RandAugment (`rand_augment_transform`): `num_layers` ops drawn uniformly with
    replacement; each applied with probability `prob` at magnitude ~ N(magnitude, magnitude_std)
    clipped to [0, magnitude_max or 10]; signed ops flip sign with probability 1/2."""
    ops: Tuple[str, ...] = RAND_TRANSFORMS
    magnitude: float = 10.0
    num_layers: int = 2
    prob: float = 0.5
    magnitude_std: float = 0.0
    magnitude_max: Optional[float] = None
    fill: Tuple[int, ...] = FILL
    resample: int = Image.BICUBIC
    translate_pct: float = 0.45

    @classmethod
    def from_config(cls, config: str, *, fill=FILL, resample=Image.BICUBIC, translate_pct: float = 0.45):
        """Parse timm's RandAugment string, e.g. 'rand-m9-mstd0.5-inc1' (sections m, n, p, mstd,
        mmax, inc; see timm.data.auto_augment.rand_augment_transform)."""
        parts = config.split("-")
        if parts[0] != "rand":
            raise ValueError(f"augmentation policy {config!r} is not supported: use a RandAugment string "
                             f"like 'rand-m9-mstd0.5-inc1' (AutoAugment and AugMix policies are not implemented)")
        kw: Dict[str, Any] = {}
        increasing = False
        for part in parts[1:]:
            m = re.fullmatch(r"(mstd|mmax|inc|m|n|p)(\d.*)", part)
            if m is None:
                raise ValueError(f"RandAugment config {config!r}: unknown section {part!r} "
                                 f"(known: m<int>, n<int>, p<float>, mstd<float>, mmax<int>, inc<0|1>)")
            key, val = m.groups()
            try:
                if key == "mstd":
                    kw["magnitude_std"] = float("inf") if float(val) > 100 else float(val)
                elif key == "mmax":
                    kw["magnitude_max"] = int(val)
                elif key == "inc":
                    increasing = bool(int(val))
                elif key == "m":
                    kw["magnitude"] = int(val)
                elif key == "n":
                    kw["num_layers"] = int(val)
                else:
                    kw["prob"] = float(val)
            except ValueError as e:
                raise ValueError(f"RandAugment config {config!r}: bad value in section {part!r}") from e
        ops = RAND_INCREASING_TRANSFORMS if increasing else RAND_TRANSFORMS
        return cls(ops=ops, fill=tuple(fill), resample=resample, translate_pct=translate_pct, **kw)

    def __call__(self, img: Image.Image, rng) -> Image.Image:
        # Same draws in the same order as timm: all op choices first, then per op: apply?, magnitude, sign.
        for idx in rng.choice(len(self.ops), self.num_layers):
            name = self.ops[int(idx)]
            if self.prob < 1.0 and rng.random() > self.prob:
                continue
            magnitude = self.magnitude
            if self.magnitude_std == float("inf"):
                magnitude = rng.uniform(0, magnitude)
            elif self.magnitude_std > 0:
                magnitude = rng.normal(magnitude, self.magnitude_std)
            magnitude = max(0.0, min(magnitude, self.magnitude_max or LEVEL_DENOM))
            negate = bool(rng.random() > 0.5) if _LEVELS[name][2] else False
            img = apply_op(img, name, magnitude, negate, fill=self.fill, resample=self.resample,
                           translate_pct=self.translate_pct)
        return img


# ---- random erasing -----------------------------------------------------------------------------
ERASE_MODES = ("const", "rand", "pixel")


@dataclasses.dataclass(frozen=True)
class RandomErasing:
    """timm's RandomErasing (one box per image): with probability `probability`, a box of
    area fraction U(min_area, max_area) and log-uniform aspect in [min_aspect, 1 / min_aspect]
    (10 tries to fit) is filled, after normalization, with zeros ('const'), one N(0, 1) colour
    ('rand') or N(0, 1) per pixel ('pixel', BEiT's setting)."""
    probability: float = 0.25
    mode: str = "pixel"
    min_area: float = 0.02
    max_area: float = 1 / 3
    min_aspect: float = 0.3

    def __post_init__(self):
        if self.mode not in ERASE_MODES:
            raise ValueError(f"random erasing mode must be one of {ERASE_MODES} (got {self.mode!r})")

    def box(self, rng, height: int, width: int) -> Tuple[int, int, int, int]:
        """(top, left, h, w) of the box to erase; h = w = 0 when nothing is erased."""
        if rng.random() > self.probability:
            return 0, 0, 0, 0
        area = height * width
        log_aspect = (math.log(self.min_aspect), math.log(1 / self.min_aspect))
        for _ in range(10):
            target_area = rng.uniform(self.min_area, self.max_area) * area
            aspect = math.exp(rng.uniform(*log_aspect))
            h = int(round(math.sqrt(target_area * aspect)))
            w = int(round(math.sqrt(target_area / aspect)))
            if w < width and h < height:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                return top, left, h, w
        return 0, 0, 0, 0


def erase(x, boxes, noise, mode: str = "pixel", xp=np):
    """Fill each image's box (after normalization). x: (B, H, W, C) float; boxes: (B, 4) int
    (top, left, h, w; h = 0: untouched); noise: (B, H, W, C) N(0, 1) draws ('pixel'; 'rand' uses
    noise[:, :1, :1, :] as the box colour; 'const' ignores it)."""
    _, height, width, _ = x.shape
    rows = xp.arange(height)[None, :, None]
    cols = xp.arange(width)[None, None, :]
    top, left, h, w = (boxes[:, i][:, None, None] for i in range(4))
    inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
    if mode == "const":
        fill = xp.zeros_like(x)
    elif mode == "rand":
        fill = xp.broadcast_to(noise[:, :1, :1, :], x.shape)
    else:
        fill = noise
    return xp.where(inside[..., None], fill.astype(x.dtype), x)


# ---- mixup / cutmix (timm's 'batch', 'pair' and 'elem' modes) -----------------------------------
MIXUP_MODES = ("batch", "pair", "elem")


@dataclasses.dataclass(frozen=True)
class Mixup:
    """timm.data.Mixup: row i is mixed with row B-1-i; targets are label-smoothed one-hots mixed
    with the row's lambda.

    mode 'batch' (timm's default): one lambda (and cutmix box) for the whole batch (`params`).
    'elem': a lambda, a mixup-or-cutmix choice and a box per row; 'pair': per pair of rows
    (i, B-1-i), which trade the same box / blend with the same lambda (`params_per_row`: arrays of
    length B). 'pair' and 'elem' need an even batch, as timm asserts."""
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    prob: float = 1.0
    switch_prob: float = 0.5
    label_smoothing: float = 0.1
    mode: str = "batch"

    def __post_init__(self):
        if not (self.mixup_alpha > 0 or self.cutmix_alpha > 0):
            raise ValueError("Mixup needs mixup_alpha > 0 or cutmix_alpha > 0")
        if self.mode not in MIXUP_MODES:
            raise ValueError(f"mixup_mode={self.mode!r}: one of {', '.join(MIXUP_MODES)}")

    def params(self, rng, height: int, width: int) -> Tuple[float, bool, Tuple[int, int, int, int]]:
        """(lam, use_cutmix, (yl, yh, xl, xh)) for one batch; lam = 1 means no mixing. With cutmix,
        lam is corrected to the clipped box's area, as timm does."""
        lam, use_cutmix = 1.0, False
        if rng.random() < self.prob:
            if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
                use_cutmix = bool(rng.random() < self.switch_prob)
                alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
                lam = float(rng.beta(alpha, alpha))
            elif self.mixup_alpha > 0:
                lam = float(rng.beta(self.mixup_alpha, self.mixup_alpha))
            else:
                use_cutmix = True
                lam = float(rng.beta(self.cutmix_alpha, self.cutmix_alpha))
        if lam == 1.0:  # timm leaves the batch alone
            return 1.0, False, (0, 0, 0, 0)
        if use_cutmix:
            box, lam = cutmix_box(rng, height, width, lam)
            return lam, True, box
        return lam, False, (0, 0, 0, 0)


    def params_per_row(self, rng, batch_size: int, height: int, width: int
                       ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """'pair' / 'elem' mode: (lam (B,) float32, use_cutmix (B,) bool, boxes (B, 4) int32 of
        (yl, yh, xl, xh)) for a batch of `batch_size`, drawn as timm's _params_per_elem and
        _mix_elem / _mix_pair draw them (per-row float32 lambdas, each cutmix row's box in row
        order, lam corrected to its clipped box). A row with lam 1 is left as it is (its box is
        empty); in 'pair' mode row B-1-i takes row i's lam, choice and box."""
        if self.mode not in ("pair", "elem"):
            raise ValueError(f"params_per_row is for mixup_mode 'pair' or 'elem' (this Mixup's is {self.mode!r}: "
                             f"use params)")
        if batch_size % 2:
            raise ValueError(f"mixup_mode={self.mode!r} needs an even batch size (timm's Mixup asserts it), got "
                             f"batch size {batch_size}: use an even `batch_size`, or mixup_mode='batch'")
        n = batch_size // 2 if self.mode == "pair" else batch_size
        lam = np.ones(n, np.float32)
        use_cutmix = np.zeros(n, bool)
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = np.asarray(rng.random(n)) < self.switch_prob
            lam_cut = np.asarray(rng.beta(self.cutmix_alpha, self.cutmix_alpha, n))  # timm's np.where draws both
            lam_mix = np.where(use_cutmix, lam_cut, np.asarray(rng.beta(self.mixup_alpha, self.mixup_alpha, n)))
        elif self.mixup_alpha > 0:
            lam_mix = np.asarray(rng.beta(self.mixup_alpha, self.mixup_alpha, n))
        else:
            use_cutmix = np.ones(n, bool)
            lam_mix = np.asarray(rng.beta(self.cutmix_alpha, self.cutmix_alpha, n))
        lam = np.where(np.asarray(rng.random(n)) < self.prob, lam_mix.astype(np.float32), lam)
        boxes = np.zeros((n, 4), np.int32)
        for i in range(n):
            if lam[i] == 1.0:
                use_cutmix[i] = False  # unmixed (timm skips the row)
            elif use_cutmix[i]:
                boxes[i], lam[i] = cutmix_box(rng, height, width, lam[i])  # lam[i]: float32, as timm's
        if self.mode == "pair":
            lam, use_cutmix, boxes = (np.concatenate([a, a[::-1]]) for a in (lam, use_cutmix, boxes))
        return lam, use_cutmix, boxes

    def draw(self, rng, batch_size: int, height: int, width: int):
        """This mode's parameters for one batch: `params` ('batch': scalars) or `params_per_row`."""
        if self.mode == "batch":
            return self.params(rng, height, width)
        return self.params_per_row(rng, batch_size, height, width)


def cutmix_box(rng, height: int, width: int, lam: float) -> Tuple[Tuple[int, int, int, int], float]:
    """timm's rand_bbox + lambda correction: a box of side sqrt(1 - lam) around a uniform centre,
    clipped to the image; returns ((yl, yh, xl, xh), 1 - box area / image area). The side is
    computed in lam's precision, as timm does (float64 for 'batch', float32 per row)."""
    ratio = np.sqrt(1 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy = int(rng.integers(0, height))
    cx = int(rng.integers(0, width))
    yl, yh = int(np.clip(cy - cut_h // 2, 0, height)), int(np.clip(cy + (cut_h + 1) // 2, 0, height))
    xl, xh = int(np.clip(cx - cut_w // 2, 0, width)), int(np.clip(cx + (cut_w + 1) // 2, 0, width))
    return (yl, yh, xl, xh), 1.0 - (yh - yl) * (xh - xl) / float(height * width)


def mix_images(x, lam, use_cutmix, box, xp=np):
    """timm's Mixup._mix_batch on an NHWC batch: cutmix pastes box (yl, yh, xl, xh) of the
    reversed batch; mixup blends x * lam + reversed * (1 - lam). lam, use_cutmix and box may be
    traced scalars (one program for every batch). Per-row parameters (lam (B,), use_cutmix (B,),
    box (B, 4): 'pair' / 'elem' mode) mix each row with its own (timm's _mix_elem / _mix_pair)."""
    if np.ndim(lam) == 1:
        return _mix_rows(x, lam, use_cutmix, box, xp)
    flipped = x[::-1]
    _, height, width, _ = x.shape
    rows = xp.arange(height)[:, None]
    cols = xp.arange(width)[None, :]
    inside = (rows >= box[0]) & (rows < box[1]) & (cols >= box[2]) & (cols < box[3])
    lam = xp.asarray(lam, x.dtype)
    cut = xp.where(inside[None, :, :, None], flipped, x)
    blend = x * lam + flipped * (xp.asarray(1, x.dtype) - lam)
    return xp.where(use_cutmix, cut, blend)


def mixup_targets(labels, num_classes: int, lam, smoothing: float = 0.1, xp=np):
    """timm's mixup_target: smoothed one-hots (off = smoothing / K, on = 1 - smoothing + off)
    mixed with the reversed batch's: y * lam + y[::-1] * (1 - lam). float32 (B, K). lam: a
    scalar, or one per row ((B,): 'pair' / 'elem' mode)."""
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    hot = labels[:, None] == xp.arange(num_classes)[None, :]
    y = xp.where(hot, xp.asarray(on, xp.float32), xp.asarray(off, xp.float32))
    lam = xp.asarray(lam, xp.float32)
    if lam.ndim == 1:  # a lambda per row ('pair' / 'elem'): timm's lam tensor of shape (B, 1)
        lam = lam[:, None]
    return y * lam + y[::-1] * (xp.asarray(1, xp.float32) - lam)


def _mix_rows(x, lam, use_cutmix, boxes, xp=np):
    """mix_images with a lambda, a cutmix choice and a box per row."""
    flipped = x[::-1]
    _, height, width, _ = x.shape
    rows = xp.arange(height)[None, :, None]
    cols = xp.arange(width)[None, None, :]
    yl, yh, xl, xh = (boxes[:, i][:, None, None] for i in range(4))
    inside = (rows >= yl) & (rows < yh) & (cols >= xl) & (cols < xh)
    lam = xp.asarray(lam, x.dtype)[:, None, None, None]
    cut = xp.where(inside[..., None], flipped, x)
    blend = x * lam + flipped * (xp.asarray(1, x.dtype) - lam)  # lam 1: x itself
    return xp.where(use_cutmix[:, None, None, None], cut, blend)
