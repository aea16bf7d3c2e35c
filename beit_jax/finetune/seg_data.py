"""Segmentation data: an ADE20K-layout folder, mmseg's training pipeline per sample, and the
metrics mmseg reports (mIoU, per-class IoU and accuracy, pixel accuracy).

Layout (ADE20K's own, `ADEChallengeData2016/`): `ROOT/images/<split>/**/NAME.jpg` and
`ROOT/annotations/<split>/**/NAME.png`, a label map per image (one class index per pixel, 255 =
ignore). `reduce_zero_label` (ADE20K: on) maps 0 ("other") to 255 and every other class k to k - 1,
as mmseg's LoadAnnotations does.

The training pipeline is unilm's (mmseg 0.11's) for ADE20K, on the host, every random choice drawn
from the sample's own seed (a function of seed, epoch and index, as classification's), so a resume
and another number of processes see the same crops:
  Resize(img_scale=(4 crop, crop), ratio_range=(0.5, 2.0), keep ratio; bilinear / nearest) ->
  RandomCrop(crop, cat_max_ratio=0.75: up to 10 tries for a crop no class fills 75% of) ->
  RandomFlip(0.5) -> PhotoMetricDistortion (brightness +-32, contrast and saturation 0.5-1.5, hue
  +-18 of 180; each with probability 0.5, contrast before or after the colour steps) -> Pad to the
  crop (image 0 after normalisation, label 255).
The HSV steps use Pillow's HSV (hue in 0-255, the shift scaled to it) where mmseg uses OpenCV's.
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import os
from collections import deque
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from ..sources import IMAGE_EXTENSIONS
from ..transforms import ImageLoadError, load_image

IGNORE = 255


@dataclasses.dataclass(frozen=True)
class SegSample:
    image: str
    annotation: str


def list_segmentation_folder(root: str, split: str) -> List[SegSample]:
    """Every image of ROOT/images/<split> with its label map ROOT/annotations/<split>/<same path>.png,
    sorted by path. Refuses a split with no images, or images without a label map (naming them)."""
    img_dir, ann_dir = os.path.join(root, "images", split), os.path.join(root, "annotations", split)
    for d in (img_dir, ann_dir):
        if not os.path.isdir(d):
            raise FileNotFoundError(f"{d} is not a folder: a segmentation dataset holds images/{split}/ and "
                                    f"annotations/{split}/ (ADE20K's layout: ADEChallengeData2016/)")
    samples, missing = [], []
    for dirpath, dirnames, files in os.walk(img_dir):
        dirnames.sort()
        for name in sorted(files):
            if os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            rel = os.path.relpath(os.path.join(dirpath, name), img_dir)
            ann = os.path.join(ann_dir, os.path.splitext(rel)[0] + ".png")
            (samples if os.path.exists(ann) else missing).append(SegSample(os.path.join(img_dir, rel), ann))
    if missing:
        raise FileNotFoundError(f"{len(missing)} images in {img_dir} have no label map in {ann_dir} (e.g. "
                                f"{missing[0].annotation}): every image needs annotations/{split}/<its name>.png")
    if not samples:
        raise ValueError(f"{img_dir} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return samples


def read_label_map(path: str, num_classes: int, reduce_zero_label: bool) -> np.ndarray:
    """(H, W) uint8 class indices (255 = ignore). A value that is neither a class nor 255 is an
    error naming the file and what to do (a wrong num_classes or reduce_zero_label would otherwise
    train on wrong labels)."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I", "I;16"):
                raise ValueError(f"{path} is a {im.mode} image: a label map is single-channel (L or P mode), one "
                                 f"class index per pixel")
            lab = np.asarray(im)
    except (OSError, SyntaxError) as e:
        raise ValueError(f"cannot read the label map {path}: {e}") from e
    lab = lab.astype(np.int64)
    if reduce_zero_label:
        lab = np.where(lab == 0, IGNORE, lab) - 1  # mmseg's: 0 -> 255, k -> k - 1, 255 stays 255
        lab[lab == IGNORE - 1] = IGNORE
    bad = (lab != IGNORE) & ((lab < 0) | (lab >= num_classes))
    if bad.any():
        v = int(lab[bad].flat[0])
        raise ValueError(f"{path} has class index {v} (after reduce_zero_label={reduce_zero_label}) but the model "
                         f"has {num_classes} classes (0..{num_classes - 1}, 255 = ignore): pass the dataset's "
                         f"num_classes, or reduce_zero_label=True for ADE20K-style maps where 0 is 'other'")
    return lab.astype(np.uint8)


# ---- mmseg's training pipeline ----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SegAugment:
    """The random part of the pipeline (see the module docstring); `__call__` -> (image uint8
    (crop, crop, 3), label uint8 (crop, crop), (valid h, valid w)). Outside the valid box is padding."""
    crop: int
    scale_range: Tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    hflip: float = 0.5
    photometric: bool = True

    def __call__(self, img: Image.Image, lab: np.ndarray, seed: int):
        rng = np.random.default_rng(seed)
        # Resize: img_scale (4 crop, crop) times a ratio, aspect kept (mmcv.imrescale)
        ratio = rng.random() * (self.scale_range[1] - self.scale_range[0]) + self.scale_range[0]
        long_edge, short_edge = int(4 * self.crop * ratio), int(self.crop * ratio)
        w, h = img.size
        f = min(long_edge / max(h, w), short_edge / min(h, w))
        size = (max(int(w * f + 0.5), 1), max(int(h * f + 0.5), 1))
        img = img.resize(size, Image.BILINEAR)
        lab = np.asarray(Image.fromarray(lab).resize(size, Image.NEAREST))
        # RandomCrop with cat_max_ratio
        box = self._crop_box(rng, lab.shape)
        if self.cat_max_ratio < 1.0:
            for _ in range(10):
                values, counts = np.unique(self._cut(lab, box), return_counts=True)
                counts = counts[values != IGNORE]
                if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                    break
                box = self._crop_box(rng, lab.shape)
        arr = self._cut(np.asarray(img), box)
        lab = self._cut(lab, box)
        if rng.random() < self.hflip:
            arr, lab = arr[:, ::-1], lab[:, ::-1]
        if self.photometric:
            arr = photometric_distortion(arr, rng)
        out = np.zeros((self.crop, self.crop, 3), np.uint8)
        out_lab = np.full((self.crop, self.crop), IGNORE, np.uint8)
        out[: arr.shape[0], : arr.shape[1]] = arr
        out_lab[: lab.shape[0], : lab.shape[1]] = lab
        return out, out_lab, (arr.shape[0], arr.shape[1])

    def _crop_box(self, rng, shape):
        margin_h, margin_w = max(shape[0] - self.crop, 0), max(shape[1] - self.crop, 0)
        y, x = int(rng.integers(0, margin_h + 1)), int(rng.integers(0, margin_w + 1))
        return y, x, y + self.crop, x + self.crop

    @staticmethod
    def _cut(a, box):
        y1, x1, y2, x2 = box
        return a[y1:y2, x1:x2]


def _convert(img: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    return np.clip(img.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def photometric_distortion(arr: np.ndarray, rng, brightness_delta: int = 32, contrast=(0.5, 1.5),
                           saturation=(0.5, 1.5), hue_delta: int = 18) -> np.ndarray:
    """mmseg's PhotoMetricDistortion on an (H, W, 3) uint8 RGB array (see the module docstring)."""
    if rng.integers(2):
        arr = _convert(arr, beta=rng.uniform(-brightness_delta, brightness_delta))
    contrast_first = rng.integers(2) == 1
    if contrast_first and rng.integers(2):
        arr = _convert(arr, alpha=rng.uniform(*contrast))
    if rng.integers(2):
        hsv = np.array(Image.fromarray(np.ascontiguousarray(arr)).convert("HSV"))
        hsv[..., 1] = _convert(hsv[..., 1], alpha=rng.uniform(*saturation))
        arr = np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"))
    if rng.integers(2):
        hsv = np.array(Image.fromarray(np.ascontiguousarray(arr)).convert("HSV"))
        shift = int(rng.integers(-hue_delta, hue_delta)) * 256 // 180
        hsv[..., 0] = ((hsv[..., 0].astype(np.int64) + shift) % 256).astype(np.uint8)
        arr = np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"))
    if not contrast_first and rng.integers(2):
        arr = _convert(arr, alpha=rng.uniform(*contrast))
    return np.ascontiguousarray(arr)


def load_train_sample(sample: Optional[SegSample], seed: int, augment: SegAugment, num_classes: int,
                      reduce_zero_label: bool):
    """(image, label, (h, w), error or None) for one training sample; padding (None) and an
    unreadable image come back all-ignore (they weigh nothing), a bad label map raises."""
    empty = (np.zeros((augment.crop, augment.crop, 3), np.uint8), np.full((augment.crop, augment.crop), IGNORE, np.uint8),
             (0, 0))
    if sample is None:
        return (*empty, None)
    lab = read_label_map(sample.annotation, num_classes, reduce_zero_label)
    try:
        img = load_image(sample.image)
    except ImageLoadError as e:
        return (*empty, str(e))
    if img.size != (lab.shape[1], lab.shape[0]):
        raise ValueError(f"{sample.image} is {img.size[0]}x{img.size[1]} but its label map {sample.annotation} is "
                         f"{lab.shape[1]}x{lab.shape[0]}: a label map has the image's size")
    return (*augment(img, lab, seed), None)


def ordered_map(fn, items: Iterable, workers: int, window: int) -> Iterator:
    """fn(item) for each item, in order, at most `window` in flight on `workers` threads."""
    if workers <= 0:
        yield from map(fn, items)
        return
    it = iter(items)
    with cf.ThreadPoolExecutor(workers, thread_name_prefix="beit-seg") as pool:
        pending: deque = deque(pool.submit(fn, x) for _, x in zip(range(max(window, 1)), it))
        while pending:
            out = pending.popleft().result()
            for x in it:
                pending.append(pool.submit(fn, x))
                break
            yield out


# ---- metrics (mmseg's) -------------------------------------------------------------------------------
def confusion(pred: np.ndarray, label: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, K) int64 counts [true class, predicted class] over the pixels not ignored."""
    valid = label != IGNORE
    idx = label[valid].astype(np.int64) * num_classes + pred[valid].astype(np.int64)
    return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def segmentation_metrics(conf: np.ndarray, names: Optional[Dict[int, str]] = None) -> Dict[str, object]:
    """mmseg's: mIoU and mAcc are the means over classes present in the labels or predictions (a
    class in neither has IoU NaN and is left out); aAcc is the pixel accuracy."""
    conf = np.asarray(conf, np.float64)
    inter = np.diag(conf)
    label_area, pred_area = conf.sum(1), conf.sum(0)
    union = label_area + pred_area - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = inter / union
        acc = inter / label_area
    names = names or {}
    return {"mIoU": float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
            "mAcc": float(np.nanmean(acc)) if np.isfinite(acc).any() else float("nan"),
            "aAcc": float(inter.sum() / max(label_area.sum(), 1)),
            "pixels": int(label_area.sum()),
            "per_class": {names.get(k, str(k)): {"IoU": None if np.isnan(iou[k]) else float(iou[k]),
                                                 "Acc": None if np.isnan(acc[k]) else float(acc[k])}
                          for k in range(len(iou))}}


def split_rows(n: int, parts: int, part: int) -> Sequence[int]:
    """The items process `part` of `parts` evaluates: every parts-th, from its own index."""
    return range(part, n, parts)


# ---- a small synthetic dataset (smoke tests, notebook 05) ------------------------------------------
SHAPES_CLASSES = ("background", "red", "green", "blue")


def write_shapes_dataset(root: str, train: int = 32, val: int = 8, size: Tuple[int, int] = (64, 96),
                         seed: int = 0) -> str:
    """ROOT/{images,annotations}/{training,validation}: noisy grey photos-to-be with red, green and
    blue rectangles and ellipses on them (class = colour, 0 = background), sizes drawn from `size`
    (so images are not square), label maps as palette-free L PNGs. Refuses a ROOT that has files."""
    from PIL import ImageDraw

    if os.path.exists(root) and os.listdir(root):
        raise FileExistsError(f"{root} is not empty: write the dataset into a new folder")
    rng = np.random.default_rng(seed)
    colours = np.array([[200, 40, 40], [40, 180, 60], [50, 70, 210]])
    for split, n in (("training", train), ("validation", val)):
        os.makedirs(os.path.join(root, "images", split))
        os.makedirs(os.path.join(root, "annotations", split))
        for i in range(n):
            w, h = (int(v) for v in rng.integers(size[0], size[1] + 1, 2))
            img = np.clip(rng.normal(128, 30, (h, w, 3)), 0, 255).astype(np.uint8)
            lab = Image.new("L", (w, h), 0)
            canvas = Image.fromarray(img)
            draw_img, draw_lab = ImageDraw.Draw(canvas), ImageDraw.Draw(lab)
            for _ in range(int(rng.integers(1, 4))):
                c = int(rng.integers(3))
                x0, y0 = int(rng.integers(0, w - 16)), int(rng.integers(0, h - 16))
                x1, y1 = x0 + int(rng.integers(12, w // 2 + 8)), y0 + int(rng.integers(12, h // 2 + 8))
                colour = tuple(int(v) for v in np.clip(colours[c] + rng.normal(0, 15, 3), 0, 255))
                shape = "rectangle" if rng.random() < 0.5 else "ellipse"
                getattr(draw_img, shape)([x0, y0, x1, y1], fill=colour)
                getattr(draw_lab, shape)([x0, y0, x1, y1], fill=c + 1)
            noisy = np.clip(np.asarray(canvas, np.float32) + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(noisy).save(os.path.join(root, "images", split, f"{split}_{i:04d}.jpg"), quality=92)
            lab.save(os.path.join(root, "annotations", split, f"{split}_{i:04d}.png"))
    return root
