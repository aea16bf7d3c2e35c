"""Fine-tuning: timm's layer decay and no-decay sets, learning on real digits, resume (with the
whole BEiT recipe on), multi-device and multi-host (2 processes x 4 devices == 1 x 8), EMA."""
from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

import beit_jax
from beit_jax import finetune
from beit_jax.checkpoints import load_flax_checkpoint
from beit_jax.mapping import flax_path_to_timm_key
from flax import traverse_util
from tests.support import TINY, cli, digits_folder, run_helper, run_process_pair

RECIPE_FLAGS = ["--aa", "rand-m9-mstd0.5-inc1", "--mixup", "0.8", "--cutmix", "1.0", "--reprob", "0.25",
                "--model-ema-decay", "0.9"]


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


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    base = tmp_path_factory.mktemp("digits")
    return digits_folder(base / "train", n_per_class=40, offset=0), digits_folder(base / "val", n_per_class=20, offset=1)


def _small_model(num_classes=10, **kw):
    # A 2-block, 192-wide BEiT at 64x64 (16 patches): the real modules, small enough for CI. That it
    # learns digits (val top-1 0.47 after 300 steps; chance 0.1) is asserted by notebook 03's test,
    # which trains this model (its CPU quick mode) with finetune.train.
    return beit_jax.create_model("beit_base_patch16_224", num_classes=num_classes, img_size=64, depth=2, embed_dim=192,
                                 num_heads=3, **kw)


def _cli(*args):
    return cli("finetune", *args)  # in-process: --max-steps stops it, no kill


def test_killed_and_resumed_run_continues_the_same_curve(digits, tmp_path):
    """With RandAugment, random erasing, mixup/cutmix and EMA on: every random choice is seeded."""
    train_dir, _ = digits
    common = ["--train", train_dir, "--model", TINY, "--random-weights", "--img-size", "32",
              "--batch-size", "16", "--steps", "8", "--warmup-steps", "2", "--lr", "1e-3",
              "--checkpoint-every", "2", "--no-progress", *RECIPE_FLAGS]
    full = _cli(*common, "--output", tmp_path / "full")
    assert full.returncode == 0, full.stderr
    part = _cli(*common, "--output", tmp_path / "part", "--max-steps", "5")  # stops after step 5 (ckpt at 4)
    assert part.returncode == 0, part.stderr
    other = _cli(*common, "--output", tmp_path / "part", "--resume", "--mixup", "0.5")
    assert other.returncode == 2 and "mixup: checkpoint 0.8, now 0.5" in other.stderr  # no silent mix of runs
    resumed = _cli(*common, "--output", tmp_path / "part", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout + resumed.stderr

    def curve(d):
        return [json.loads(line)["loss"] for line in open(d / "metrics.jsonl")]

    assert len(curve(tmp_path / "part")) == 8
    np.testing.assert_allclose(curve(tmp_path / "part"), curve(tmp_path / "full"), rtol=1e-5, atol=1e-6)
    for export in ("model.msgpack", "model_ema.msgpack"):
        a = load_flax_checkpoint(tmp_path / "full" / export)["params"]
        b = load_flax_checkpoint(tmp_path / "part" / export)["params"]
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_multi_device_train_step_equals_single_device(tmp_path):
    """Plain, and with erasing, cutmix, mixup and EMA (whose pairing crosses devices)."""
    outs = {}
    for n in (1, 8):
        res = run_helper("train_step.py", tmp_path / f"p{n}.npz", devices=n)
        assert res.returncode == 0, res.stderr[-3000:]
        assert f"devices={n}" in res.stdout
        outs[n] = np.load(tmp_path / f"p{n}.npz")
    assert set(outs[1].files) == set(outs[8].files) and "augment/ema/head/kernel" in outs[1].files
    assert not np.allclose(outs[1]["augment/head/kernel"], outs[1]["plain/head/kernel"])  # augmentation acted
    for k in outs[1].files:
        np.testing.assert_allclose(outs[8][k], outs[1][k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_linear_probe_on_extracted_features(digits, tmp_path):
    from beit_jax.extract import extract, read_features

    train_dir, val_dir = digits
    model, variables = beit_jax.create_model(TINY, num_classes=0, rng=0)
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
    model, variables = beit_jax.create_model(TINY, num_classes=4, img_size=32, depth=1)
    cfg = finetune.TrainConfig(lr=1e-3, warmup_steps=1, total_steps=10, grad_accum=2)
    tx = finetune.make_optimizer(model, variables, cfg)
    trainer = finetune.Trainer(model, cfg, (0.5,) * 3, (0.5,) * 3)
    state = trainer.put_state(finetune.create_train_state(model, variables, tx))
    rng = np.random.RandomState(0)
    kernels = [np.asarray(state.params["head"]["kernel"])]
    for _ in range(6):
        batch = (rng.randint(0, 256, (4, 32, 32, 3)).astype(np.uint8), rng.randint(0, 4, (4,)).astype(np.int32),
                 np.ones((4,), np.float32))
        state, _ = trainer.step(state, *batch)
        kernels.append(np.asarray(state.params["head"]["kernel"]))
    changed = [not np.array_equal(a, b) for a, b in zip(kernels, kernels[1:])]
    # an update every 2nd micro-step; the first one uses the warmup's starting lr (0), so it moves nothing
    assert changed == [False, False, False, True, False, True]


def test_train_augmentation_is_seeded_and_random(imagenet_dir):
    from beit_jax.transforms import TrainTransform

    img = beit_jax.load_image(sorted(imagenet_dir.iterdir())[0])
    tf = TrainTransform((224, 224), mean=(0.5,) * 3, std=(0.5,) * 3)
    a, b, c = tf.crop_uint8(img, 1), tf.crop_uint8(img, 1), tf.crop_uint8(img, 2)
    assert a.shape == (224, 224, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)  # same seed, same crop: resumable
    x = tf(img, 3)
    assert x.dtype == np.float32 and -1.0 <= x.min() and x.max() <= 1.0


def test_two_processes_train_and_evaluate_like_one(digits, tmp_path):
    """2 processes x 4 devices vs one process: same global batches, same augmentation, same
    parameters, same exact eval counts; the pair is stopped and resumed, and process 1 has an output
    folder of its own that stays empty (process 0 writes and reads the checkpoint). The one process
    is this one, on its one device (1 device == 8: test_multi_device_train_step_equals_single_device)."""
    train_dir, val_dir = digits
    common = ["--train", train_dir, "--val", val_dir, "--model", TINY, "--random-weights", "--img-size", "32",
              "--batch-size", "16", "--steps", "4", "--warmup-steps", "1", "--lr", "1e-3", "--checkpoint-every", "2",
              "--workers", "1", "--no-progress", *RECIPE_FLAGS]
    single = cli("finetune", *common, "--output", tmp_path / "single")
    assert single.returncode == 0, single.stderr

    def args_of(extra):
        return lambda i: ["finetune", *common, "--output", tmp_path / ("multi" if i == 0 else "p1-own-folder"), *extra]

    run_process_pair(args_of(["--max-steps", "2"]), tmp_path, "first")
    outs = run_process_pair(args_of(["--resume"]), tmp_path, "resumed")
    assert "resumed from" in outs[0][0] + outs[0][1]
    assert not (tmp_path / "p1-own-folder").exists() or not os.listdir(tmp_path / "p1-own-folder")

    report = {name: json.loads(text.strip().splitlines()[-1]) for name, text in
              (("single", single.stdout), ("multi", outs[0][0]))}
    assert (report["single"]["processes"], report["single"]["local_batch"]) == (1, 16)
    assert (report["multi"]["processes"], report["multi"]["devices"], report["multi"]["local_batch"]) == (2, 8, 8)
    for key in ("val", "val_ema"):  # 200 val images in 13 global batches of 16: the last one half padding
        s, m = report["single"][key], report["multi"][key]
        assert s["count"] == m["count"] == 200
        assert (s["top1_hits"], s["top5_hits"]) == (m["top1_hits"], m["top5_hits"]), key
        assert m["loss"] == pytest.approx(s["loss"], rel=1e-4)

    def curve(d):
        return [json.loads(line)["loss"] for line in open(d / "metrics.jsonl")]

    np.testing.assert_allclose(curve(tmp_path / "multi"), curve(tmp_path / "single"), rtol=1e-4)
    for export in ("model.msgpack", "model_ema.msgpack"):
        a = traverse_util.flatten_dict(load_flax_checkpoint(tmp_path / "single" / export)["params"])
        b = traverse_util.flatten_dict(load_flax_checkpoint(tmp_path / "multi" / export)["params"])
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-6, err_msg=f"{export} {k}")


def test_beit_recipe_on_digits_trains_and_resumes_exactly(digits, tmp_path):
    """--recipe beit's settings (base: lr 4e-3 at batch 1024, layer decay 0.65, drop path 0.1,
    RandAugment, mixup/cutmix, erasing 0.25) on the 2-block model: stopped and resumed == straight."""
    train_dir, _ = digits
    model, _ = _small_model()
    kwargs, batch, drop_path, note = finetune.recipe_settings("beit", model, 400, batch_size=32, steps=12)
    assert (kwargs["lr"], kwargs["layer_decay"], drop_path, kwargs["warmup_steps"]) == (4e-3 * 32 / 1024, 0.65, 0.1, 2)
    assert (kwargs["aa"], kwargs["mixup"], kwargs["cutmix"], kwargs["reprob"]) == ("rand-m9-mstd0.5-inc1", 0.8, 1.0, 0.25)
    cfg = finetune.TrainConfig(**kwargs, model_ema_decay=0.99)
    model, variables = _small_model(drop_path_rate=drop_path)
    kw = dict(batch_size=batch, cfg=cfg, progress=False, checkpoint_every=4)  # (val accuracy: benchmarks/finetune_recipe.py)
    finetune.train(model, variables, str(train_dir), output_dir=str(tmp_path / "straight"), **kw)
    finetune.train(model, variables, str(train_dir), output_dir=str(tmp_path / "part"), max_steps=6, **kw)
    finetune.train(model, variables, str(train_dir), output_dir=str(tmp_path / "part"), resume=True, **kw)

    def curve(d):
        return [json.loads(line)["loss"] for line in open(d / "metrics.jsonl")]

    assert len(curve(tmp_path / "part")) == 12
    np.testing.assert_allclose(curve(tmp_path / "part"), curve(tmp_path / "straight"), rtol=1e-5, atol=1e-6)
    for export in ("model.msgpack", "model_ema.msgpack"):
        a = jax.tree_util.tree_leaves(load_flax_checkpoint(tmp_path / "straight" / export))
        b = jax.tree_util.tree_leaves(load_flax_checkpoint(tmp_path / "part" / export))
        for x, y in zip(a, b):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_model_ema_equals_timms_model_ema_on_optimizer_steps_only():
    """timm's ModelEma (what BEiT uses) fed the same weights; with grad_accum=2 the EMA moves only
    on the micro-steps where the optimizer updates."""
    import torch
    from timm.utils import ModelEma

    model, variables = beit_jax.create_model(TINY, num_classes=4, img_size=32, depth=1)
    cfg = finetune.TrainConfig(lr=1e-2, warmup_steps=1, total_steps=10, grad_accum=2, model_ema_decay=0.8)
    tx = finetune.make_optimizer(model, variables, cfg)
    trainer = finetune.Trainer(model, cfg, (0.5,) * 3, (0.5,) * 3)
    state = trainer.put_state(finetune.create_train_state(model, variables, tx, ema=True))
    leaves, treedef = jax.tree_util.tree_flatten(jax.device_get(state.params))
    holder = torch.nn.ParameterList([torch.nn.Parameter(torch.from_numpy(np.array(v))) for v in leaves])
    timm_ema = ModelEma(holder, decay=0.8, device="cpu")
    rng = np.random.RandomState(0)
    for i in range(6):
        batch = (rng.randint(0, 256, (4, 32, 32, 3)).astype(np.uint8), rng.randint(0, 4, (4,)).astype(np.int32),
                 np.ones((4,), np.float32))
        state, _ = trainer.step(state, *batch)
        if i % 2 == 1:  # the optimizer updated: timm's loop calls model_ema.update(model) here
            with torch.no_grad():
                for p, v in zip(holder, jax.tree_util.tree_leaves(jax.device_get(state.params))):
                    p.copy_(torch.from_numpy(np.array(v)))
            timm_ema.update(holder)
        expected = [p.detach().numpy() for p in timm_ema.ema]
        got = jax.tree_util.tree_leaves(jax.device_get(state.ema_params))
        assert jax.tree_util.tree_structure(jax.device_get(state.ema_params)) == treedef
        for g, e in zip(got, expected):
            np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-7)
    assert not np.allclose(got[0], leaves[0])  # it moved


def test_recipe_follows_model_size_and_explicit_flags_win():
    from beit_jax.cli import build_parser
    from beit_jax.cli.finetune import settings_from_args

    def settings(*flags, model="beit_base_patch16_224"):
        args = build_parser().parse_args(["finetune", "--train", "x", "--output", "y", "--model", model, *flags])
        return settings_from_args(args, 12800, model)

    cfg, batch, drop_path, note = settings("--recipe", "beit")
    assert (batch, cfg.lr, cfg.layer_decay, drop_path) == (1024, 4e-3, 0.65, 0.1)
    assert (cfg.total_steps, cfg.warmup_steps) == (1200, 240)  # 100 epochs of 12 steps, 20 warmup epochs
    assert (cfg.aa, cfg.mixup, cfg.cutmix, cfg.reprob, cfg.label_smoothing) == ("rand-m9-mstd0.5-inc1", 0.8, 1.0, 0.25, 0.1)
    cfg, batch, drop_path, _ = settings("--recipe", "beit", model="beit_large_patch16_224")
    assert (cfg.lr, cfg.layer_decay, drop_path, cfg.total_steps) == (1e-3, 0.75, 0.2, 600)
    cfg, batch, drop_path, _ = settings("--recipe", "beit", model="beitv2_base_patch16_224")
    assert (cfg.lr, cfg.layer_decay, drop_path) == (5e-4, 0.6, 0.2)
    cfg, batch, drop_path, _ = settings("--recipe", "beit", "--batch-size", "256", "--mixup", "0", "--drop-path", "0.3")
    assert (batch, cfg.lr, cfg.mixup, cfg.cutmix, drop_path) == (256, 1e-3, 0.0, 1.0, 0.3)
    cfg, batch, drop_path, note = settings()  # no recipe: timm's defaults, augmentations off
    assert note is None and (batch, drop_path, cfg.aa, cfg.mixup, cfg.cutmix, cfg.reprob) == (32, 0.1, None, 0, 0, 0)
    assert cfg.model_ema_decay is None


def test_each_process_decodes_its_rows_of_every_global_batch(tmp_path, capsys):
    """train_batches for rows 0:2 and 2:4 of a global batch of 4 == rows of the whole batch (same
    images, augmentation seeds, labels), across an epoch boundary and from a resume step; an
    unreadable image gets weight 0 and is reported."""
    from beit_jax.data import Decoder, list_image_folder
    from beit_jax.transforms import TrainTransform

    for c in range(2):
        (tmp_path / f"c{c}").mkdir()
        for i in range(5):
            Image.fromarray(np.full((12, 10, 3), 20 * i + 100 * c, np.uint8)).save(tmp_path / f"c{c}" / f"{i}.png")
    (tmp_path / "c0" / "broken.png").write_bytes(b"not a png")
    refs, labels, _ = list_image_folder(tmp_path)
    tf = TrainTransform((8, 8), auto_augment="rand-m9-mstd0.5-inc1")
    with Decoder(tf, workers=0) as dec:
        def take(start, rows=None, n=3):
            stream = finetune.train_batches(refs, labels, 4, 0, start, dec, (8, 8, 3), rows)
            return [next(stream) for _ in range(n)]

        whole, halves = take(0), list(zip(take(0, slice(0, 2)), take(0, slice(2, 4))))
        resumed = take(2, n=1)
    assert [b.epoch for b in whole] == [0, 0, 1]  # 11 images: 2 global batches per epoch
    for b, (lo, hi) in zip(whole, halves):
        for field in ("images", "labels", "weights", "seeds"):
            np.testing.assert_array_equal(getattr(b, field), np.concatenate([getattr(lo, field), getattr(hi, field)]))
    for field in ("images", "labels", "weights", "seeds"):
        np.testing.assert_array_equal(getattr(resumed[0], field), getattr(whole[2], field))
    seen = [e for b in whole for e in b.errors]
    assert seen  # (the broken image is in these batches: a fixed seed, a fixed order)
    assert sum(b.weights.size - b.weights.sum() for b in whole) == len(seen)
    assert all(path.endswith("broken.png") and "cannot read image" in reason for path, reason in seen)


# ---- classes kept straight, divergence stopped, other runs kept ---------------------------------
@pytest.fixture(scope="module")
def tiny_digits(tmp_path_factory):
    base = tmp_path_factory.mktemp("rdigits")
    return (digits_folder(base / "train", n_per_class=3, size=32, offset=0),
            digits_folder(base / "val", n_per_class=2, size=32, offset=1))


def _finetune(*args):
    return cli("finetune", "--model", TINY, "--random-weights", "--img-size", "32", "--batch-size", "8",
                   "--warmup-steps", "1", "--no-progress", *args)


def test_val_classes_are_matched_by_name(tiny_digits, tmp_path):
    train, val = tiny_digits
    shifted = tmp_path / "val"  # the same classes, one missing: by position every label would move
    shutil.copytree(val, shifted)
    shutil.rmtree(shifted / "digit_0")
    res = _finetune("--train", train, "--val", shifted, "--output", tmp_path / "a", "--steps", "2", "--lr", "1e-9")
    assert res.returncode == 0, res.stderr
    from beit_jax import finetune
    _, labels, _ = finetune._val_by_train_classes(str(shifted), sorted(os.listdir(train)))
    assert labels.min() == 1  # digit_1 is class 1 of the training set, not class 0
    (shifted / "cats").mkdir()
    shutil.copy(next((shifted / "digit_1").iterdir()), shifted / "cats" / "x.png")
    res = _finetune("--train", train, "--val", shifted, "--output", tmp_path / "b", "--steps", "2")
    assert res.returncode == 2 and "classes the training set does not have: ['cats']" in res.stderr


def test_resume_with_other_classes_and_rerun_without_resume_are_refused(tiny_digits, tmp_path):
    train, _ = tiny_digits
    out = tmp_path / "run"
    first = _finetune("--train", train, "--output", out, "--steps", "4", "--max-steps", "2", "--checkpoint-every", "1")
    assert first.returncode == 0, first.stderr
    metrics = (out / "metrics.jsonl").read_text()
    again = _finetune("--train", train, "--output", out, "--steps", "4")
    assert again.returncode == 2 and "already holds a fine-tuning run" in again.stderr
    assert (out / "metrics.jsonl").read_text() == metrics  # nothing of the first run was touched
    renamed = tmp_path / "renamed"
    shutil.copytree(train, renamed)
    (renamed / "digit_9").rename(renamed / "nine")  # still 10 classes, one under another name
    res = _finetune("--train", renamed, "--output", out, "--steps", "4", "--resume")
    assert res.returncode == 2 and "trained on other classes" in res.stderr and "'nine'" in res.stderr


def test_divergence_stops_training_and_keeps_the_last_good_checkpoint(tiny_digits, tmp_path):
    train, _ = tiny_digits
    out = tmp_path / "run"
    res = _finetune("--train", train, "--output", out, "--steps", "6", "--lr", "1e30", "--warmup-steps", "2",
                    "--checkpoint-every", "1")
    assert res.returncode == 2, res.stderr[-2000:]
    assert "training diverged" in res.stderr and "nothing was exported" in res.stderr
    assert not (out / "model.msgpack").exists()
    from flax import serialization
    payload = serialization.msgpack_restore((out / "checkpoint.msgpack").read_bytes())
    flat = [np.asarray(v) for v in __import__("jax").tree_util.tree_leaves(payload["state"]["params"])]
    assert all(np.isfinite(v).all() for v in flat)  # the kept checkpoint is a good one
    res = _finetune("--train", train, "--output", tmp_path / "nan", "--steps", "2", "--lr", "nan")
    assert res.returncode == 2 and "lr=nan" in res.stderr


def test_elem_mixup_reaches_the_step_resumes_with_the_same_draws_and_refuses_an_odd_batch(tiny_digits, tmp_path,
                                                                                          monkeypatch):
    """--mixup-mode elem: per-row lambdas and boxes over the global batch, drawn on the host from
    (seed, step) alone, so a resumed run mixes its steps as a straight run does (the resume
    machinery itself: test_killed_and_resumed_run_continues_the_same_curve); an odd batch is refused
    before anything is written. (augment's tests check the per-row mixing against timm's.)"""
    from beit_jax.finetune import steps

    train, _ = tiny_digits
    seen = []
    step = steps.Trainer.step
    monkeypatch.setattr(steps.Trainer, "step", lambda self, *a: seen.append(jax.device_get(a[-1])) or step(self, *a))
    mixing = ["--train", train, "--steps", "2", "--mixup", "0.8", "--cutmix", "1.0", "--checkpoint-every", "1",
              "--seed", "3", "--output", tmp_path / "run"]
    part = _finetune(*mixing, "--mixup-mode", "elem", "--max-steps", "1")
    assert part.returncode == 0, part.stderr
    resumed = _finetune(*mixing, "--mixup-mode", "elem", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert len(seen) == 2 and (tmp_path / "run" / "model.msgpack").exists()
    mixer = finetune.TrainConfig(mixup=0.8, cutmix=1.0, mixup_mode="elem").mixer()
    for s, mix in enumerate(seen):  # what a straight run draws at step s
        want = finetune.mix_arrays(*mixer.draw(finetune.batch_mix_rng(3, s), 8, 32, 32))
        assert mix["lam"].shape == (8,) and mix["box"].shape == (8, 4)
        for k in want:
            np.testing.assert_array_equal(mix[k], want[k])
    lam = np.concatenate([m["lam"] for m in seen])
    cut = np.concatenate([m["cutmix"] for m in seen])
    assert len(set(lam.tolist())) > 8 and 0 < cut.sum() < len(cut)  # rows drew their own lambda and mode
    odd = cli("finetune", "--model", TINY, "--random-weights", "--img-size", "32", "--batch-size", "7",
              "--no-progress", *mixing[:-1], tmp_path / "odd", "--mixup-mode", "pair")
    assert odd.returncode == 2
    assert "mixup_mode='pair' needs an even global batch" in odd.stderr and "got batch size 7" in odd.stderr
    assert "pass an even --batch-size, or --mixup-mode batch" in odd.stderr
    assert not (tmp_path / "odd").exists()  # refused before anything was written
    from beit_jax.finetune.state import _settings_mismatch
    saved = finetune.loop._settings(finetune.TrainConfig(mixup=0.8), 8)
    older = {k: v for k, v in saved.items() if k != "mixup_mode"}  # a checkpoint from before mixup_mode
    assert _settings_mismatch("ckpt", older, saved) == ""  # it ran in batch mode and resumes so
    elem = finetune.loop._settings(finetune.TrainConfig(mixup=0.8, mixup_mode="elem"), 8)
    assert "mixup_mode: checkpoint 'batch', now 'elem'" in _settings_mismatch("ckpt", older, elem)
