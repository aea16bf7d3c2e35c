"""Fine-tuning: timm's layer decay and no-decay sets, learning on real digits, resume, multi-device."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

import beit_jax
from beit_jax import finetune
from beit_jax.weights import flax_path_to_timm_key
from conftest import ROOT
from flax import traverse_util


@pytest.mark.parametrize("name,global_pool,decay", [
    ("beit_base_patch16_224", "avg", 0.65),
    ("beitv2_base_patch16_224", "token", 0.75),
])
def test_layer_decay_and_weight_decay_equal_timm(name, global_pool, decay):
    import timm
    from timm.optim._param_groups import param_groups_layer_decay

    tm = timm.create_model(name, global_pool=global_pool, num_classes=10)
    groups = param_groups_layer_decay(tm, weight_decay=0.05, no_weight_decay_list=tm.no_weight_decay(),
                                      layer_decay=decay)
    by_param = {id(p): g for g in groups for p in g["params"]}
    timm_scale = {n: by_param[id(p)]["lr_scale"] for n, p in tm.named_parameters()}
    timm_decay = {n: by_param[id(p)]["weight_decay"] > 0 for n, p in tm.named_parameters()}

    model, variables = beit_jax.create_model(name, global_pool=global_pool, num_classes=10)
    scales = traverse_util.flatten_dict(finetune.layer_lr_multipliers(model, variables, decay))
    mask = traverse_util.flatten_dict(finetune.weight_decay_mask(model, variables))
    ours_scale = {flax_path_to_timm_key(p): v for p, v in scales.items()}
    ours_decay = {flax_path_to_timm_key(p): v for p, v in mask.items()}
    assert set(ours_scale) == set(timm_scale)
    for k in timm_scale:  # every parameter, not a count
        assert ours_scale[k] == pytest.approx(timm_scale[k], rel=1e-12), k
        assert ours_decay[k] == timm_decay[k], k
    assert len(set(timm_scale.values())) == 14  # stem, 12 blocks (+ final norm), head


def _digits_folder(root, n_per_class=None, size=64, offset=0):
    """scikit-learn's bundled 8x8 digits as an ImageFolder of upscaled RGB PNGs."""
    from sklearn.datasets import load_digits

    d = load_digits()
    idx = np.arange(len(d.target))[offset::2]  # even / odd split: train / val
    counts = {}
    for i in idx:
        label = int(d.target[i])
        if n_per_class and counts.get(label, 0) >= n_per_class:
            continue
        counts[label] = counts.get(label, 0) + 1
        img = Image.fromarray((d.images[i] * (255 / 16)).astype(np.uint8)).resize((size, size), Image.NEAREST)
        out = root / f"digit_{label}"
        out.mkdir(parents=True, exist_ok=True)
        img.convert("RGB").save(out / f"{i:04d}.png")
    return root


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    base = tmp_path_factory.mktemp("digits")
    return _digits_folder(base / "train", n_per_class=40, offset=0), _digits_folder(base / "val", n_per_class=20, offset=1)


def _small_model(num_classes=10, **kw):
    # A 2-block base-width BEiT at 64x64 (16 patches): the real modules, small enough for CPU CI.
    return beit_jax.create_model("beit_base_patch16_224", num_classes=num_classes, img_size=64, depth=2, **kw)


def test_small_config_learns_digits(digits, tmp_path):
    train_dir, val_dir = digits
    model, variables = _small_model()
    # From random init (no Hub here): digits need gentler crops than ImageNet's (0.08, 1) and no flips.
    cfg = finetune.TrainConfig(lr=2e-3, warmup_steps=10, total_steps=200, layer_decay=0.85, weight_decay=0.05,
                               label_smoothing=0.1, crop_scale=(0.6, 1.0), hflip=0.0, seed=0)
    out = finetune.train(model, variables, str(train_dir), val_dir=str(val_dir), output_dir=str(tmp_path),
                         batch_size=32, cfg=cfg, progress=False, checkpoint_every=1000)
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "metrics.jsonl")]
    print(f"digits: loss {np.mean(losses[:10]):.3f} -> {np.mean(losses[-10:]):.3f}, "
          f"val top1 {out['val']['top1']:.3f} top5 {out['val']['top5']:.3f}")
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10])
    assert out["val"]["count"] == 200 and out["val"]["top1"] > 0.35  # chance is 0.1
    # the export loads through create_model
    m2, v2 = beit_jax.create_model("beit_base_patch16_224", img_size=64, depth=2,
                                   checkpoint_path=str(tmp_path / "model.msgpack"))
    assert m2.num_classes == 10


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "beit_jax.cli", "finetune", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=900)


def test_killed_and_resumed_run_continues_the_same_curve(digits, tmp_path):
    train_dir, _ = digits
    common = ["--train", train_dir, "--model", "beit_base_patch16_224", "--random-weights", "--img-size", "32",
              "--batch-size", "16", "--steps", "8", "--warmup-steps", "2", "--lr", "1e-3",
              "--checkpoint-every", "2", "--no-progress"]
    full = _cli(*common, "--output", tmp_path / "full")
    assert full.returncode == 0, full.stderr
    part = _cli(*common, "--output", tmp_path / "part", "--max-steps", "5")  # stops after step 5 (ckpt at 4)
    assert part.returncode == 0, part.stderr
    resumed = _cli(*common, "--output", tmp_path / "part", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout + resumed.stderr

    def curve(d):
        return [json.loads(line)["loss"] for line in open(d / "metrics.jsonl")]

    assert len(curve(tmp_path / "part")) == 8
    np.testing.assert_allclose(curve(tmp_path / "part"), curve(tmp_path / "full"), rtol=1e-5, atol=1e-6)
    a = beit_jax.weights.load_flax_checkpoint(tmp_path / "full" / "model.msgpack", None)["params"]
    b = beit_jax.weights.load_flax_checkpoint(tmp_path / "part" / "model.msgpack", None)["params"]
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_multi_device_train_step_equals_single_device(tmp_path):
    script = ROOT / "tests" / "helpers" / "train_step.py"
    outs = {}
    for n in (1, 8):
        env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
        res = subprocess.run([sys.executable, str(script), str(tmp_path / f"p{n}.npz")], env=env,
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        assert f"devices={n}" in res.stdout
        outs[n] = np.load(tmp_path / f"p{n}.npz")
    assert set(outs[1].files) == set(outs[8].files)
    for k in outs[1].files:
        np.testing.assert_allclose(outs[8][k], outs[1][k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_linear_probe_on_extracted_features(digits, tmp_path):
    from beit_jax.extract import extract, read_features

    train_dir, val_dir = digits
    model, variables = beit_jax.create_model("beit_base_patch16_224", num_classes=0, img_size=64, depth=2, rng=0)
    feats = {}
    for split, d in (("train", train_dir), ("val", val_dir)):
        extract(str(d), str(tmp_path / split), model, variables, batch_size=32, progress=False)
        paths, f = read_features(tmp_path / split)
        labels = np.array([int(os.path.basename(os.path.dirname(p)).split("_")[1]) for p in paths])
        feats[split] = (f, labels)
    res = finetune.linear_probe(*feats["train"], *feats["val"], steps=300)
    print(f"linear probe on random-init features: train {res['train_top1']:.3f} val {res['val_top1']:.3f}")
    assert res["val_top1"] > 0.5


def test_gradient_accumulation_updates_every_k_steps():
    model, variables = beit_jax.create_model("beit_base_patch16_224", num_classes=4, img_size=32, depth=1)
    cfg = finetune.TrainConfig(lr=1e-3, warmup_steps=1, total_steps=10, grad_accum=2)
    tx = finetune.make_optimizer(model, variables, cfg)
    trainer = finetune.ShardedTrainer(model, tx, cfg, (0.5,) * 3, (0.5,) * 3)
    state = trainer.put_state(finetune.create_train_state(model, variables, tx))
    rng = np.random.RandomState(0)
    kernels = [np.asarray(state.params["head"]["kernel"])]
    for _ in range(6):
        batch = (rng.randint(0, 256, (4, 32, 32, 3)).astype(np.uint8), rng.randint(0, 4, (4,)).astype(np.int32),
                 np.ones((4,), np.float32))
        state, _ = trainer.train_step(state, *trainer.put(*batch))
        kernels.append(np.asarray(state.params["head"]["kernel"]))
    changed = [not np.array_equal(a, b) for a, b in zip(kernels, kernels[1:])]
    # an update every 2nd micro-step; the first one uses the warmup's starting lr (0), so it moves nothing
    assert changed == [False, False, False, True, False, True]


def test_train_augmentation_is_seeded_and_random(imagenet_dir):
    from beit_jax.augment import TrainTransform

    img = beit_jax.load_image(sorted(imagenet_dir.iterdir())[0])
    tf = TrainTransform((224, 224), mean=(0.5,) * 3, std=(0.5,) * 3)
    a, b, c = tf.crop_uint8(img, 1), tf.crop_uint8(img, 1), tf.crop_uint8(img, 2)
    assert a.shape == (224, 224, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)  # same seed, same crop: resumable
    x = tf(img, 3)
    assert x.dtype == np.float32 and -1.0 <= x.min() and x.max() <= 1.0
