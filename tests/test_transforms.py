"""Preprocessing is bit-exact with timm's eval transform on real files, for every data config."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import beit_jax
from beit_jax.models import PRETRAINED_CFGS
from beit_jax.transforms import ImageLoadError, load_image

# Every distinct data config in the registry (size, crop, mean/std, interpolation).
DATA_CONFIGS = sorted({(c.input_size, c.crop_pct, c.interpolation, c.mean, c.std, c.crop_mode)
                       for c in PRETRAINED_CFGS.values() if c.has_weights})

# Files in ../shared/data/odd-images that must fail to load (and why).
BROKEN = {
    "broken.png": "cannot identify image file",
    "broken_data_stream.png": "unrecognized data stream",
    "decompression_bomb.gif": "DecompressionBomb",
    "hopper_bad.p7": "cannot identify image file",
    "truncated_end_chunk.png": "Truncated",
}


def _timm_transform(cfg):
    from timm.data import create_transform

    input_size, crop_pct, interpolation, mean, std, crop_mode = cfg
    return create_transform(input_size=input_size, crop_pct=crop_pct, interpolation=interpolation,
                            mean=mean, std=std, crop_mode=crop_mode, is_training=False)


def _ours(cfg):
    input_size, crop_pct, interpolation, mean, std, crop_mode = cfg
    return beit_jax.create_transform(input_size=input_size, crop_pct=crop_pct, interpolation=interpolation,
                                     mean=mean, std=std, crop_mode=crop_mode)


def _assert_bit_exact(ours, theirs, path):
    ref = theirs.numpy().transpose(1, 2, 0)
    assert ours.dtype == np.float32 and ours.shape == ref.shape, path
    assert np.array_equal(ours, ref), f"{path}: max diff {np.abs(ours - ref).max()}"


@pytest.mark.parametrize("cfg", DATA_CONFIGS, ids=lambda c: f"{c[0][1]}-crop{c[1]}-mean{c[3][0]}")
def test_bit_exact_on_imagenet_sample(cfg, imagenet_dir):
    ours, theirs = _ours(cfg), _timm_transform(cfg)
    paths = sorted(imagenet_dir.iterdir())[::20]  # 50 images spread over all classes
    assert len(paths) == 50
    for p in paths:
        _assert_bit_exact(ours(load_image(p)), theirs(Image.open(p).convert("RGB")), p)


@pytest.mark.parametrize("cfg", DATA_CONFIGS, ids=lambda c: f"{c[0][1]}-crop{c[1]}-mean{c[3][0]}")
def test_bit_exact_on_odd_images(cfg, odd_dir):
    ours, theirs = _ours(cfg), _timm_transform(cfg)
    readable = 0
    for p in sorted(odd_dir.iterdir()):
        if p.name in BROKEN:
            continue
        _assert_bit_exact(ours(load_image(p)), theirs(Image.open(p).convert("RGB")), p)
        readable += 1
    assert readable >= 20


def test_broken_files_raise_a_named_error(odd_dir, tmp_path):
    for name, reason in BROKEN.items():
        with pytest.raises(ImageLoadError, match=reason) as err:
            load_image(odd_dir / name)
        assert str(odd_dir / name) in str(err.value)
    with pytest.raises(ImageLoadError, match="missing.jpg"):
        load_image(tmp_path / "missing.jpg")


def test_resolve_data_config_from_model():
    model = beit_jax.build_model("beitv2_large_patch16_224")
    cfg = beit_jax.resolve_data_config(model)
    assert cfg == dict(input_size=(3, 224, 224), interpolation="bicubic", mean=(0.485, 0.456, 0.406),
                       std=(0.229, 0.224, 0.225), crop_pct=0.95, crop_mode="center")
    big = beit_jax.build_model("beit_base_patch16_224", img_size=384)
    assert beit_jax.resolve_data_config(big)["input_size"] == (3, 384, 384)
    assert beit_jax.resolve_data_config("beit_large_patch16_512")["crop_pct"] == 1.0


def test_exif_transpose_is_opt_in(odd_dir):
    plain = load_image(odd_dir / "hopper_orientation_6.jpg")
    rotated = load_image(odd_dir / "hopper_orientation_6.jpg", exif_transpose=True)
    assert plain.size == (128, 128) and rotated.size == (128, 128)
    assert not np.array_equal(np.asarray(plain), np.asarray(rotated))


def _jpeg_bytes(path, long_side=None, quality=90) -> bytes:
    import io

    img = Image.open(path).convert("RGB")
    if long_side:
        s = long_side / max(img.size)
        img = img.resize((round(img.width * s), round(img.height * s)), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def test_fast_decode_reduces_only_large_jpegs_deterministically_and_close_to_exact(imagenet_dir, odd_dir):
    """`decode="fast"` (extract --decode fast): a JPEG at least twice the resize size in both sides
    is decoded at 1/2-1/8 scale in the DCT domain, then resized from there as the full image would
    be: the same pixels every time, close to but not equal to exact. Every other file (PNG, GIF,
    TIFF, ... and JPEGs under twice the size) gives exactly the exact path's pixels."""
    from beit_jax.data import decode
    from beit_jax.sources import ImageRef
    from beit_jax.transforms import DRAFT_INFO

    t = beit_jax.create_transform(**beit_jax.resolve_data_config("beit_base_patch16_224"))  # resize to 248

    def both(data: bytes, name: str):
        ref = ImageRef(name, name, data=data)
        (exact, e1), (fast, e2) = decode(ref, t), decode(ref, t, fast=True)
        assert e1 is None and e2 is None, (name, e1, e2)
        return exact, fast

    untouched = 0
    for p in [*sorted(odd_dir.iterdir()), *sorted(imagenet_dir.iterdir())[:20]]:
        if p.name in BROKEN:
            continue
        with Image.open(p) as img:
            reduced = img.format == "JPEG" and min(img.size) >= 2 * 248  # hopper_bad_exif.jpg: 500 x 500
        exact, fast = both(p.read_bytes(), p.name)
        assert np.array_equal(exact, fast) != reduced, p.name
        untouched += not reduced
    assert untouched >= 35

    diffs = []
    for p in sorted(imagenet_dir.iterdir())[::100]:  # re-encoded at 2048 px: 1/4 or 1/8 scale decodes
        data = _jpeg_bytes(p, long_side=2048)
        img = load_image(data, resized_size=t.resized_size)
        (full_w, full_h), box = img.info[DRAFT_INFO]
        assert max(full_w, full_h) == 2048 and img.width <= -(-full_w // 4) and min(img.size) >= 248, (p.name, img.size)
        exact, fast = both(data, p.name)
        assert np.array_equal(fast, both(data, p.name)[1])  # deterministic
        assert fast.shape == exact.shape == (224, 224, 3) and not np.array_equal(fast, exact)
        diffs.append(np.abs(fast.astype(np.int16) - exact.astype(np.int16)).mean())
    assert 0 < np.mean(diffs) < 1.5, diffs  # measured: about 0.8 of 255 on average
