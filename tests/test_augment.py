"""Training augmentation against timm: each RandAugment op's pixels, the RandAugment / crop /
erasing / mixup sampling rules draw for draw, and the erasing / mixup pixel ops and targets.

timm draws from Python's `random`, `np.random` and torch's RNG; beit-jax draws from a per-sample
numpy Generator. To compare the rules themselves, the tests hand beit-jax a generator that reads
timm's own global streams (`TimmPythonRandom`, `TimmNumpyRandom`): same draws, same choices.
"""
from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image

import beit_jax
from beit_jax import augment
from beit_jax.transforms import TrainTransform

AA = "rand-m9-mstd0.5-inc1"


class TimmPythonRandom:
    """A Generator-like view of the streams timm's auto_augment / RandomErasing / RRC draw from."""

    def random(self):
        return random.random()

    def uniform(self, a, b):
        return random.uniform(a, b)

    def normal(self, mu, sigma):
        return random.gauss(mu, sigma)

    def integers(self, lo, hi):
        return random.randint(lo, hi - 1)

    def choice(self, n, size):  # RandAugment picks its ops with np.random.choice
        return np.random.choice(n, size)


class TimmNumpyRandom:
    """A Generator-like view of np.random's global stream (timm.data.Mixup draws from it)."""

    def random(self, size=None):
        return np.random.rand() if size is None else np.random.rand(size)

    def beta(self, a, b, size=None):
        return np.random.beta(a, b, size=size)

    def integers(self, lo, hi):
        return np.random.randint(lo, hi)


@pytest.fixture(scope="module")
def photo(imagenet_dir):
    # non-square, so a swapped width/height shows
    return beit_jax.load_image(sorted(imagenet_dir.iterdir())[7]).resize((96, 80), Image.BICUBIC)


def _timm_hparams(mean, interpolation=Image.BICUBIC, size=64):
    # what timm's transforms_imagenet_train passes to rand_augment_transform
    return dict(translate_const=int(size * 0.45), img_mean=tuple(min(255, round(255 * m)) for m in mean),
                interpolation=interpolation)


@pytest.mark.parametrize("name", sorted(set(augment.RAND_TRANSFORMS) | set(augment.RAND_INCREASING_TRANSFORMS)))
def test_each_randaugment_op_gives_timms_pixels(name, photo):
    from timm.data.auto_augment import AugmentOp

    mean = (0.485, 0.456, 0.406)  # fill (124, 116, 104): a dropped fill colour would show
    hp = _timm_hparams(mean)
    for magnitude in (0, 2.5, 5, 9, 10):
        for seed in (0, 1):  # random.random() after seed 0 is > 0.5 (timm negates), after seed 1 it is not
            random.seed(seed)
            negate = random.random() > 0.5
            random.seed(seed)
            ours = augment.apply_op(photo, name, magnitude, negate, fill=hp["img_mean"], resample=Image.BICUBIC)
            if "Posterize" in name and augment.op_argument(name, magnitude) == 0:
                # keep 0 bits: timm's ImageOps.posterize(img, 0) raises on Pillow >= 11; older Pillow
                # (and beit-jax) give black
                assert not np.asarray(ours).any()
                continue
            expected = AugmentOp(name, prob=1.0, magnitude=magnitude, hparams=hp)(photo)
            assert ours.size == expected.size and ours.mode == expected.mode
            assert np.array_equal(np.asarray(ours), np.asarray(expected)), (name, magnitude, negate)
    # the op does something at the recipe's magnitude (no vacuous pass)
    assert not np.array_equal(np.asarray(augment.apply_op(photo, name, 9, True, fill=hp["img_mean"])),
                              np.asarray(photo))


@pytest.mark.parametrize("config", [AA, "rand-m7-n3-p0.8-mstd1", "rand-m12-mmax15-mstd101-inc1"])
def test_randaugment_policy_makes_timms_choices(config, photo):
    from timm.data.auto_augment import rand_augment_transform

    mean = (0.5, 0.5, 0.5)
    hp = _timm_hparams(mean)
    timm_ra = rand_augment_transform(config, dict(hp))
    ours = augment.RandAugment.from_config(config, fill=hp["img_mean"], resample=Image.BICUBIC)
    changed = 0
    for seed in range(12):
        random.seed(seed), np.random.seed(seed)
        expected = np.asarray(timm_ra(photo))
        random.seed(seed), np.random.seed(seed)
        got = np.asarray(ours(photo, TimmPythonRandom()))
        assert np.array_equal(got, expected), (config, seed)
        changed += not np.array_equal(got, np.asarray(photo))
    assert changed >= 6


def test_randaugment_config_errors_are_clear():
    with pytest.raises(ValueError, match="not supported"):
        augment.RandAugment.from_config("augmix-m5")
    with pytest.raises(ValueError, match="unknown section 'q3'"):
        augment.RandAugment.from_config("rand-m9-q3")


def test_train_transform_crop_and_randaugment_equal_timms(photo):
    """The whole PIL stage (RandomResizedCrop + RandAugment) against timm's train transform."""
    import torch
    from timm.data import create_transform

    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    timm_tf = create_transform(64, is_training=True, interpolation="bicubic", auto_augment=AA, hflip=0.0,
                               mean=mean, std=std, re_prob=0.0)
    ours = TrainTransform((64, 64), interpolation="bicubic", mean=mean, std=std, hflip=0.0, auto_augment=AA)
    for seed in range(6):
        random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
        expected = timm_tf(photo).numpy().transpose(1, 2, 0)
        random.seed(seed), np.random.seed(seed)
        got = np.asarray(ours.augment(photo, TimmPythonRandom()))
        np.testing.assert_allclose(beit_jax.transforms.normalize(got, mean, std), expected, atol=1e-6)


def _box_of_change(before, after):
    rows, cols = np.nonzero((before != after).any(-1))
    if rows.size == 0:
        return 0, 0, 0, 0
    return rows.min(), cols.min(), rows.max() - rows.min() + 1, cols.max() - cols.min() + 1


@pytest.mark.parametrize("mode", ["pixel", "const", "rand"])
def test_random_erasing_equals_timms_for_its_box(mode):
    import torch
    from timm.data.random_erasing import RandomErasing

    x = np.random.RandomState(0).randn(3, 40, 56).astype(np.float32)  # normalized CHW, non-square
    timm_re = RandomErasing(0.5, mode=mode, device="cpu")
    ours = augment.RandomErasing(0.5, mode=mode)
    erased = 0
    for seed in range(30):
        random.seed(seed), torch.manual_seed(seed)
        expected = timm_re(torch.from_numpy(x.copy())).numpy().transpose(1, 2, 0)
        random.seed(seed)
        box = ours.box(TimmPythonRandom(), 40, 56)
        hwc = x.transpose(1, 2, 0)
        noise = np.random.RandomState(seed).randn(1, 40, 56, 3).astype(np.float32)
        got = augment.erase(hwc[None], np.asarray([box]), noise, mode)[0]
        if mode == "pixel":  # timm's box is where its output differs (normal noise differs everywhere)
            assert _box_of_change(hwc, expected) == box, seed
        outside = (got == hwc).all(-1)
        t, l, h, w = box
        assert not outside[t:t + h, l:l + w].any() and outside.sum() == 40 * 56 - h * w
        np.testing.assert_array_equal(np.where(outside[..., None], got, 0), np.where(outside[..., None], expected, 0))
        if mode == "const":  # deterministic fill: the whole image equals timm's
            np.testing.assert_array_equal(got, expected)
        elif mode == "pixel":
            np.testing.assert_array_equal(got[t:t + h, l:l + w], noise[0, t:t + h, l:l + w])
        else:
            np.testing.assert_array_equal(got[t:t + h, l:l + w], np.broadcast_to(noise[0, 0, 0], (h, w, 3)))
        erased += h > 0
    assert 8 <= erased <= 22  # probability 0.5 over 30 draws


def test_mixup_cutmix_equal_timms_mixed_batch_and_targets():
    """timm.data.Mixup(0.8, 1.0, smoothing 0.1) vs Mixup.params + mix_images/mixup_targets under jit."""
    import jax
    import jax.numpy as jnp
    import torch
    from timm.data import Mixup as TimmMixup

    b, k, h, w = 6, 10, 24, 32
    x = np.random.RandomState(1).randn(b, 3, h, w).astype(np.float32)
    labels = np.asarray([3, 1, 4, 1, 5, 9], np.int64)
    mix = jax.jit(lambda x, y, lam, cut, box: (augment.mix_images(x, lam, cut, box, jnp),
                                                augment.mixup_targets(y, k, lam, 0.1, jnp)))
    seen = set()
    for prob in (1.0, 0.6):
        timm_mix = TimmMixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=prob, label_smoothing=0.1, num_classes=k)
        ours = augment.Mixup(0.8, 1.0, prob=prob, label_smoothing=0.1)
        for seed in range(10):
            np.random.seed(seed)
            ex, ey = timm_mix(torch.from_numpy(x.copy()), torch.from_numpy(labels))
            np.random.seed(seed)
            lam, use_cutmix, box = ours.params(TimmNumpyRandom(), h, w)
            gx, gy = mix(x.transpose(0, 2, 3, 1), labels.astype(np.int32), np.float32(lam), use_cutmix,
                         np.asarray(box, np.int32))
            np.testing.assert_allclose(np.asarray(gx), ex.numpy().transpose(0, 2, 3, 1), atol=1e-6, rtol=1e-6)
            np.testing.assert_allclose(np.asarray(gy), ey.numpy(), atol=1e-6, rtol=1e-6)
            seen.add("none" if lam == 1.0 else "cutmix" if use_cutmix else "mixup")
    assert seen == {"none", "cutmix", "mixup"}


@pytest.fixture(scope="module")
def photo_batch(imagenet_dir):
    """Six real photos, 24x32, normalized as the train step does (NCHW for timm)."""
    from beit_jax.transforms import normalize

    imgs = [np.asarray(beit_jax.load_image(p).resize((32, 24), Image.BICUBIC)) for p in sorted(imagenet_dir.iterdir())[:6]]
    return np.asarray(normalize(np.stack(imgs), (0.5,) * 3, (0.5,) * 3)).transpose(0, 3, 1, 2).copy()


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
@pytest.mark.parametrize("alphas", [(0.8, 1.0), (0.8, 0.0), (0.0, 1.0)])
def test_mixup_modes_equal_timms_on_real_images(mode, alphas, photo_batch):
    """timm.data.Mixup(mode=...) vs Mixup.draw + mix_images/mixup_targets under jit, fed timm's
    np.random stream: per-row float32 lambdas, each cutmix row's own box, lam corrected per row."""
    import jax
    import jax.numpy as jnp
    import torch
    from timm.data import Mixup as TimmMixup

    x = photo_batch
    b, _, h, w = x.shape
    k = 10
    labels = np.asarray([3, 1, 4, 1, 5, 9], np.int64)
    mix = jax.jit(lambda x, y, lam, cut, box: (augment.mix_images(x, lam, cut, box, jnp),
                                                augment.mixup_targets(y, k, lam, 0.1, jnp)))
    seen = set()
    for prob in (1.0, 0.6):
        timm_mix = TimmMixup(mixup_alpha=alphas[0], cutmix_alpha=alphas[1], prob=prob, mode=mode,
                             label_smoothing=0.1, num_classes=k)
        ours = augment.Mixup(*alphas, prob=prob, label_smoothing=0.1, mode=mode)
        for seed in range(6):
            np.random.seed(seed)
            ex, ey = timm_mix(torch.from_numpy(x.copy()), torch.from_numpy(labels))
            timm_next = np.random.rand()
            np.random.seed(seed)
            lam, use_cutmix, box = ours.draw(TimmNumpyRandom(), b, h, w)
            assert np.random.rand() == timm_next  # the same number of draws as timm, not only the same values
            gx, gy = mix(x.transpose(0, 2, 3, 1), labels.astype(np.int32), np.asarray(lam, np.float32),
                         np.asarray(use_cutmix), np.asarray(box, np.int32))
            np.testing.assert_allclose(np.asarray(gx), ex.numpy().transpose(0, 2, 3, 1), atol=1e-6, rtol=1e-6)
            np.testing.assert_allclose(np.asarray(gy), ey.numpy(), atol=1e-6, rtol=1e-6)
            for row_lam, row_cut in zip(np.atleast_1d(lam), np.atleast_1d(use_cutmix)):
                seen.add("none" if row_lam == 1.0 else "cutmix" if row_cut else "mixup")
            if mode != "batch":
                assert np.shape(lam) == (b,) and np.shape(box) == (b, 4)
                if mode == "pair":  # rows i and B-1-i share everything
                    for a in (lam, use_cutmix, box):
                        np.testing.assert_array_equal(a, a[::-1])
    want = {"none"} | ({"mixup"} if alphas[0] else set()) | ({"cutmix"} if alphas[1] else set())
    assert seen == want
    if mode != "batch":
        assert len(set(np.asarray(lam).tolist())) > 1  # per-row draws, not one lambda repeated


@pytest.mark.parametrize("mode", ["pair", "elem"])
def test_mixup_pair_and_elem_refuse_an_odd_batch_as_timm_does(mode, photo_batch):
    import torch
    from timm.data import Mixup as TimmMixup

    x = photo_batch[:5]
    with pytest.raises(AssertionError, match="even"):
        TimmMixup(mode=mode, num_classes=10)(torch.from_numpy(x.copy()), torch.zeros(5, dtype=torch.int64))
    with pytest.raises(ValueError, match=f"mixup_mode='{mode}' needs an even batch size.*got batch size 5"):
        augment.Mixup(mode=mode).draw(np.random.default_rng(0), 5, 24, 32)
    with pytest.raises(ValueError, match="mixup_mode='row': one of batch, pair, elem"):
        augment.Mixup(mode="row")


def test_train_transform_is_seeded_per_sample(photo):
    tf = TrainTransform((64, 64), auto_augment=AA, re_prob=1.0)
    a, b, c = tf.crop_uint8(photo, 5), tf.crop_uint8(photo, 5), tf.crop_uint8(photo, 6)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.array_equal(tf.erase_box(5), tf.erase_box(5)) and tf.erase_box(5)[2] > 0
    x = tf(photo, 5)  # the host path: same crop, erased box filled with seeded noise
    box = tf.erase_box(5)
    assert _box_of_change(beit_jax.transforms.normalize(a, tf.mean, tf.std), x) == tuple(box)
    np.testing.assert_array_equal(x, tf(photo, 5))
