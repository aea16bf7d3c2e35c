"""timm's eval preprocessing, bit for bit, without torch: PIL image -> (H, W, 3) float32 array.

timm (center crop mode): Resize(short side -> floor(size / crop_pct), PIL interpolation, long side
truncated as torchvision does), CenterCrop(size), ToTensor (/255), Normalize(mean, std).
The train transform composes beit_jax.augment's pieces in timm's order (TrainTransform).
"""
from __future__ import annotations

import math
import os
import re
import warnings
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from .augment import RandAugment, RandomErasing, erase, random_resized_crop_params

INTERPOLATION = {
    "nearest": Image.NEAREST,
    "bilinear": Image.BILINEAR,
    "bicubic": Image.BICUBIC,
    "box": Image.BOX,
    "hamming": Image.HAMMING,
    "lanczos": Image.LANCZOS,
}

DEFAULT_CROP_PCT = 0.875


class ImageLoadError(OSError):
    """An image file could not be opened or decoded; the message names the file."""


def resolve_data_config(model=None, **overrides) -> Dict[str, Any]:
    """The eval data config of a model (from its pretrained tag), like timm's resolve_data_config.

    Returns dict(input_size=(3, H, W), interpolation, mean, std, crop_pct, crop_mode). The input
    size follows the model's img_size (a 224 tag built at img_size=384 takes 384 inputs); keyword
    arguments override any entry.
    """
    cfg: Dict[str, Any] = dict(input_size=(3, 224, 224), interpolation="bicubic",
                               mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                               crop_pct=DEFAULT_CROP_PCT, crop_mode="center")
    if isinstance(model, str):  # a name: its tag's config
        from .models import get_pretrained_cfg  # here, so decode workers need not import JAX

        pcfg, model = get_pretrained_cfg(model), None
    else:
        pcfg = getattr(model, "pretrained_cfg", None)
    if pcfg is not None:
        cfg.update(input_size=tuple(pcfg.input_size), interpolation=pcfg.interpolation,
                   mean=tuple(pcfg.mean), std=tuple(pcfg.std), crop_pct=pcfg.crop_pct,
                   crop_mode=pcfg.crop_mode)
    if model is not None and hasattr(model, "img_size"):
        cfg["input_size"] = (getattr(model, "in_chans", 3), model.img_size, model.img_size)
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    return cfg


def as_hw(size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    if isinstance(size, int):
        return size, size
    size = tuple(size)
    return (size[-2], size[-1]) if len(size) >= 2 else (size[0], size[0])


def resize_short_side(img: Image.Image, size: int, resample: int) -> Image.Image:
    """torchvision Resize(int): short side -> size, long side int(size * long / short)."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) == (w, h):
        return img
    return img.resize((new_w, new_h), resample)


def center_crop(img: Image.Image, size: Tuple[int, int]) -> Image.Image:
    """torchvision CenterCrop on a PIL image (zero padding when the image is smaller)."""
    crop_h, crop_w = size
    w, h = img.size
    if crop_w > w or crop_h > h:
        pad_l = (crop_w - w) // 2 if crop_w > w else 0
        pad_t = (crop_h - h) // 2 if crop_h > h else 0
        canvas = Image.new(img.mode, (max(w, crop_w), max(h, crop_h)), 0)
        canvas.paste(img, (pad_l, pad_t))
        img = canvas
        w, h = img.size
        if (w, h) == (crop_w, crop_h):
            return img
    top = int(round((h - crop_h) / 2.0))
    left = int(round((w - crop_w) / 2.0))
    return img.crop((left, top, left + crop_w, top + crop_h))


def to_uint8_array(img: Image.Image) -> np.ndarray:
    arr = np.asarray(img, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def normalize(x, mean: Sequence[float], std: Sequence[float]):
    """ToTensor + Normalize on uint8 (..., H, W, C): (x / 255 - mean) / std in float32, torch's rounding.

    Works on numpy arrays and on jax arrays (so batches can travel to the device as uint8).
    """
    xp = np if isinstance(x, np.ndarray) else _jnp()
    x = x.astype(xp.float32) / xp.float32(255.0)
    return (x - xp.asarray(mean, dtype=xp.float32)) / xp.asarray(std, dtype=xp.float32)


def _jnp():
    import jax.numpy as jnp
    return jnp


def to_normalized_array(img: Image.Image, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    return normalize(to_uint8_array(img), mean, std)


class EvalTransform:
    """Callable PIL.Image -> (H, W, 3) float32, equal to timm's eval transform. Picklable."""

    def __init__(self, input_size, interpolation="bicubic", mean=(0.485, 0.456, 0.406),
                 std=(0.229, 0.224, 0.225), crop_pct=DEFAULT_CROP_PCT, crop_mode="center"):
        if interpolation not in INTERPOLATION:
            raise ValueError(f"interpolation must be one of {sorted(INTERPOLATION)} (got {interpolation!r})")
        if crop_mode not in ("center", "squash"):
            raise ValueError(f"crop_mode {crop_mode!r} is not supported (use 'center' or 'squash')")
        self.size = as_hw(input_size)
        self.interpolation = interpolation
        self.mean, self.std = tuple(mean), tuple(std)
        self.crop_pct = crop_pct or DEFAULT_CROP_PCT
        self.crop_mode = crop_mode
        self.scale_size = tuple(math.floor(s / self.crop_pct) for s in self.size)
        if crop_mode == "center" and self.scale_size[0] != self.scale_size[1]:
            raise ValueError(f"center crop needs a square input_size (got {self.size}); BEiT inputs are square")

    def resize_and_crop(self, img: Image.Image) -> Image.Image:
        resample = INTERPOLATION[self.interpolation]
        if DRAFT_INFO in img.info:  # decoded at a reduced scale (`load_image(resized_size=...)`): the
            (w, h), box = img.info[DRAFT_INFO]  # full image's resize, sampled from the reduced pixels
            return center_crop(img.resize(self.resized_size(w, h), resample, box=box), self.size)
        if self.crop_mode == "squash":
            w, h = img.size
            if (h, w) != self.scale_size:
                img = img.resize((self.scale_size[1], self.scale_size[0]), resample)
        else:
            img = resize_short_side(img, self.scale_size[0], resample)
        return center_crop(img, self.size)

    def resized_size(self, w: int, h: int) -> Tuple[int, int]:
        """(w, h) of an image of that size after the resize (before the crop)."""
        if self.crop_mode == "squash":
            return self.scale_size[1], self.scale_size[0]
        size = self.scale_size[0]
        return (size, int(size * h / w)) if w <= h else (int(size * w / h), size)

    def __call__(self, img: Image.Image) -> np.ndarray:
        return to_normalized_array(self.resize_and_crop(img), self.mean, self.std)

    def crop_uint8(self, img: Image.Image) -> np.ndarray:
        """Resize + crop only: (H, W, 3) uint8; `normalize` finishes the job (on host or device)."""
        return to_uint8_array(self.resize_and_crop(img))

    def __repr__(self):
        return (f"EvalTransform(size={self.size}, scale_size={self.scale_size}, "
                f"interpolation={self.interpolation!r}, crop_pct={self.crop_pct}, mean={self.mean}, std={self.std})")


class TrainTransform:
    """timm's train transform (`transforms_imagenet_train`) without torch, every random choice
    drawn from a per-sample seed:

      RandomResizedCrop(scale, ratio) -> horizontal flip (p=hflip) -> RandAugment (`auto_augment`,
      e.g. 'rand-m9-mstd0.5-inc1'; colour jitter is off as in timm when RandAugment is on)
      -> ToTensor + Normalize -> RandomErasing (`re_prob`, `re_mode`).

    The PIL stage runs on the host (`crop_uint8`: an (H, W, 3) uint8 array that travels to the
    device as is). Erasing acts on normalized pixels, so the fine-tuning loop applies it on the
    device from `erase_box(seed)`; `__call__` runs the whole chain on the host (normalized
    float32, erased pixels drawn from the same seed). Same seed, same image: resumable.
    """

    def __init__(self, input_size, interpolation="bicubic", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                 scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip: float = 0.5,
                 auto_augment: Optional[str] = None, re_prob: float = 0.0, re_mode: str = "pixel"):
        if interpolation not in INTERPOLATION:
            raise ValueError(f"interpolation must be one of {sorted(INTERPOLATION)} (got {interpolation!r})")
        self.size = as_hw(input_size)
        self.interpolation = interpolation
        self.mean, self.std = tuple(mean), tuple(std)
        self.scale, self.ratio, self.hflip = tuple(scale), tuple(ratio), hflip
        self.auto_augment = auto_augment or None
        self.rand_augment = None
        if self.auto_augment:
            # timm's aa_params: fill with the mean colour, translate 45% of the size, the crop's interpolation
            fill = tuple(min(255, round(255 * m)) for m in self.mean)
            self.rand_augment = RandAugment.from_config(self.auto_augment, fill=fill,
                                                        resample=INTERPOLATION[interpolation])
        self.erasing = RandomErasing(re_prob, mode=re_mode) if re_prob > 0 else None

    def augment(self, img: Image.Image, rng) -> Image.Image:
        """The PIL stage with an explicit random generator (see beit_jax.augment)."""
        top, left, h, w = random_resized_crop_params(img.width, img.height, rng, self.scale, self.ratio)
        # torchvision's resized_crop: crop, then resize (a resize with box= reads pixels past the box edge)
        img = img.crop((left, top, left + w, top + h)).resize((self.size[1], self.size[0]),
                                                               INTERPOLATION[self.interpolation])
        if self.hflip > 0 and rng.random() < self.hflip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        if self.rand_augment is not None:
            img = self.rand_augment(img, rng)
        return img

    def crop_uint8(self, img: Image.Image, seed: Optional[int] = None) -> np.ndarray:
        """Crop, flip and RandAugment: (H, W, 3) uint8."""
        return to_uint8_array(self.augment(img, np.random.default_rng(seed)))

    def erase_box(self, seed: Optional[int] = None) -> np.ndarray:
        """(top, left, h, w) int32 of the box random erasing fills for this seed (zeros: none).
        Drawn from its own stream of the seed, so it needs no image."""
        if self.erasing is None:
            return np.zeros(4, np.int32)
        rng = np.random.default_rng(None if seed is None else [seed, 1])
        return np.asarray(self.erasing.box(rng, *self.size), np.int32)

    def __call__(self, img: Image.Image, seed: Optional[int] = None) -> np.ndarray:
        x = normalize(self.crop_uint8(img, seed), self.mean, self.std)
        if self.erasing is None:
            return x
        box = self.erase_box(seed)
        noise = np.random.default_rng(None if seed is None else [seed, 2]).standard_normal(x.shape, np.float32)
        return erase(x[None], box[None], noise[None], self.erasing.mode)[0]

    def __repr__(self):
        return (f"TrainTransform(size={self.size}, scale={self.scale}, ratio={self.ratio}, hflip={self.hflip}, "
                f"interpolation={self.interpolation!r}, auto_augment={self.auto_augment!r}, "
                f"erasing={self.erasing})")


def create_transform(input_size=(3, 224, 224), interpolation="bicubic", mean=(0.485, 0.456, 0.406),
                     std=(0.229, 0.224, 0.225), crop_pct=None, crop_mode="center",
                     is_training: bool = False, **train_kwargs) -> Callable[[Image.Image], np.ndarray]:
    """timm's `create_transform(**data_config)`: the eval transform by default, `TrainTransform`
    with is_training=True (train_kwargs: scale, ratio, hflip, auto_augment, re_prob, re_mode)."""
    if is_training:
        return TrainTransform(input_size, interpolation=interpolation, mean=mean, std=std, **train_kwargs)
    return EvalTransform(input_size, interpolation, mean, std, crop_pct, crop_mode)


DECODE_MODES = ("exact", "fast")
DRAFT_INFO = "beit_jax.draft"  # Image.info key: ((full w, full h), box of the full image in the reduced one)


def load_image(path: Union[str, os.PathLike, bytes], mode: str = "RGB", exif_transpose: bool = False,
               name: Optional[str] = None, resized_size: Optional[Callable[[int, int], Tuple[int, int]]] = None) -> Image.Image:
    """Open and fully decode an image as `mode` (RGB by default, as timm's dataset does).

    path may also be the encoded bytes (name then labels errors). Any failure (missing,
    truncated, not an image, decompression bomb) raises ImageLoadError naming the file.
    exif_transpose applies the EXIF orientation (timm does not, so the default is off).

    resized_size (w, h) -> (w', h'): the size the caller will resize the image to; given it, a
    JPEG at least twice that size in both sides is decoded at 1/2, 1/4 or 1/8 scale in the DCT
    domain (Pillow's `draft`), never below that size: several times faster on large photos, but
    not bit-equal to a full decode followed by the same resize (`--decode fast`). Other formats,
    JPEGs under twice the size, and exif_transpose=True decode exactly as without it.
    """
    import io

    if isinstance(path, (bytes, bytearray, memoryview)):
        src, label = io.BytesIO(path), name or "<bytes>"
    else:
        src = label = os.fspath(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            warnings.filterwarnings("ignore", message="Palette images with Transparency")
            with Image.open(src) as img:
                drafted = None
                if resized_size is not None and img.format == "JPEG" and not exif_transpose:  # (a turn would swap the box)
                    full = img.size
                    drafted = img.draft(img.mode, resized_size(*full))
                    drafted = (full, drafted[1]) if drafted and img.size != full else None
                if exif_transpose:
                    from PIL import ImageOps
                    img = ImageOps.exif_transpose(img)
                img = img.convert(mode)  # decodes every pixel: a truncated file fails here
                img.load()
                if drafted is not None:  # what resize_and_crop needs to map the reduced image exactly
                    img.info[DRAFT_INFO] = drafted
                return img
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError,
            Image.DecompressionBombWarning, EOFError) as e:
        reason = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", label, str(e))
        raise ImageLoadError(f"cannot read image {label}: {type(e).__name__}: {reason}") from e
