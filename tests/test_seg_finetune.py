"""Segmentation fine-tuning: the loss equals transformers' BeitForSemanticSegmentation(labels=),
the lr schedule torch's LinearLR x PolynomialLR (mmcv's warmup x poly), the metrics
scikit-learn's; `beit-jax finetune-seg` on a synthetic shapes dataset raises mIoU, resumes
exactly, gives the same state on 8 devices as on one (BatchNorm over the global batch), skips a
broken image with a warning and exports a folder transformers loads with the same logits."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch
from flax import serialization, traverse_util
from PIL import Image

from beit_jax.finetune import seg
from beit_jax.finetune.seg_data import (IGNORE, SegAugment, confusion, list_segmentation_folder, read_label_map,
                                        segmentation_metrics, write_shapes_dataset)
from beit_jax.segmentation import create_segmentation_model, save_hf_folder
from tests.support import cli, run_cli
from tests.test_segmentation import hf_segmenter, photos

TINY_SEG = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                out_indices=(1, 2, 3, 4), auxiliary_channels=16)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """32 + 8 synthetic images with label maps, plus one truncated JPEG among the training images."""
    root = tmp_path_factory.mktemp("seg") / "shapes"
    write_shapes_dataset(str(root), train=32, val=8)
    broken = root / "images" / "training" / "training_0000.jpg"
    broken.write_bytes(broken.read_bytes()[:200])
    return root


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """A tiny 5-class segmenter folder (random weights) to fine-tune to the dataset's 4 classes."""
    model, variables = create_segmentation_model("beit_base_upernet_640.ade20k", num_classes=5, img_size=64,
                                                 **TINY_SEG)
    return save_hf_folder(str(tmp_path_factory.mktemp("seg") / "start"), model, variables)


def test_loss_equals_transformers_with_labels(imagenet_dir, tmp_path):
    hf = hf_segmenter("base-like")
    hf.save_pretrained(tmp_path / "hf")
    model, variables = create_segmentation_model(str(tmp_path / "hf"))
    x = photos(imagenet_dir, 2, 64)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, model.config.num_labels, (2, 64, 64))
    labels[:, :10] = IGNORE  # ignored pixels weigh nothing
    with torch.no_grad():
        want = hf(torch.from_numpy(x).permute(0, 3, 1, 2), labels=torch.from_numpy(labels)).loss.item()
    got, (main, correct, count, _) = seg.seg_loss(model, variables, x, labels)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    assert int(count) == (labels != IGNORE).sum()


def test_schedule_is_mmcv_warmup_times_poly_and_layer_decay_is_unilms():
    cfg = seg.SegTrainConfig(lr=2e-3, warmup_steps=10, total_steps=50, layer_decay=0.8)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.ChainedScheduler([
        torch.optim.lr_scheduler.LinearLR(opt, start_factor=cfg.warmup_ratio, total_iters=cfg.warmup_steps),
        torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=cfg.total_steps, power=1.0)])
    want = []
    for _ in range(cfg.total_steps):
        want.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    got = [float(seg.poly_schedule(cfg)(t)) for t in range(cfg.total_steps)]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-12)

    # (the `start` fixture's model: one compiled init for both)
    model, variables = create_segmentation_model("beit_base_upernet_640.ade20k", num_classes=5, img_size=64,
                                                 **TINY_SEG)
    ids = traverse_util.flatten_dict(seg.seg_layer_ids(variables["params"], 4), sep="/")
    assert ids["backbone/patch_embed/proj/kernel"] == ids["backbone/cls_token"] == 0
    assert ids["backbone/blocks_0/attn/qkv/kernel"] == 1 and ids["backbone/blocks_3/mlp/fc2/bias"] == 4
    assert ids["decode_head/classifier/kernel"] == ids["fpn1_0/kernel"] == ids["auxiliary_head/convs_0/conv/kernel"] == 5
    # weight decay where unilm's constructor puts it: 2+ dimensions (relative position tables too), not 1-D
    tx = seg.make_seg_optimizer(model, variables["params"], cfg)
    ones = jax.tree_util.tree_map(np.ones_like, variables["params"])
    zero = jax.tree_util.tree_map(np.zeros_like, variables["params"])
    upd, _ = jax.jit(tx.update)(zero, tx.init(ones), ones)  # no gradient: what moves is weight decay alone
    flat = traverse_util.flatten_dict(upd, sep="/")
    assert np.abs(flat["backbone/blocks_0/attn/relative_position_bias_table"]).max() > 0
    assert np.abs(flat["backbone/blocks_0/norm1/scale"]).max() == 0 and np.abs(flat["decode_head/classifier/bias"]).max() == 0


def test_metrics_equal_scikit_learn():
    from sklearn.metrics import accuracy_score, jaccard_score, recall_score

    rng = np.random.default_rng(0)
    label = rng.integers(0, 5, (3, 40, 50)).astype(np.uint8)
    label[:, :5] = IGNORE
    pred = np.where(rng.random(label.shape) < 0.6, label, rng.integers(0, 5, label.shape)) % 5
    pred[pred == 4] = 3  # class 4 is never predicted; class 5 exists nowhere (IoU NaN, left out)
    conf = sum(confusion(p, lab, 6) for p, lab in zip(pred, label))
    m = segmentation_metrics(conf)
    valid = label != IGNORE
    t, p = label[valid], pred[valid]
    iou = jaccard_score(t, p, labels=list(range(5)), average=None)
    np.testing.assert_allclose([m["per_class"][str(k)]["IoU"] for k in range(5)], iou)
    assert m["per_class"]["5"]["IoU"] is None
    np.testing.assert_allclose(m["mIoU"], iou.mean())
    np.testing.assert_allclose(m["mAcc"], recall_score(t, p, labels=list(range(5)), average="macro"))
    np.testing.assert_allclose(m["aAcc"], accuracy_score(t, p))


def test_bad_datasets_are_refused_with_the_file_named(tmp_path):
    root = tmp_path / "d"
    write_shapes_dataset(str(root), train=6, val=0)
    maps = sorted((root / "annotations" / "training").glob("*.png"))
    lab = next(p for p in maps if np.asarray(Image.open(p)).max() == 3)
    with pytest.raises(ValueError, match=f"{lab.name} has class index 3 .* 3 classes .*reduce_zero_label"):
        read_label_map(str(lab), 3, False)
    raw, reduced = np.asarray(Image.open(lab)), read_label_map(str(lab), 3, True)  # mmseg's: 0 -> 255, k -> k - 1
    assert (reduced[raw == 0] == IGNORE).all() and (reduced[raw > 0] == raw[raw > 0] - 1).all()
    lab.unlink()
    with pytest.raises(FileNotFoundError, match=f"1 images .* no label map .*{lab.name}"):
        list_segmentation_folder(str(root), "training")
    r = cli("finetune-seg", "--data", root, "--output", tmp_path / "o", "--model", tmp_path / "nowhere",
            "--val-split", "nope", "--no-progress")
    assert r.returncode == 2 and "error:" in r.stderr


def test_augmentation_is_seeded_and_keeps_labels_on_their_pixels(tmp_path):
    root = tmp_path / "d"
    write_shapes_dataset(str(root), train=1, val=0, size=(90, 90))
    s = list_segmentation_folder(str(root), "training")[0]
    img, lab = Image.open(s.image).convert("RGB"), read_label_map(s.annotation, 4, False)
    aug = SegAugment(64, photometric=False)
    a, b = aug(img, lab, 7), aug(img, lab, 7)
    assert all(np.array_equal(x, y) for x, y in zip(a[:2], b[:2])) and a[2] == b[2]
    assert not all(np.array_equal(x, y) for x, y in zip(a[:2], aug(img, lab, 8)[:2]))
    out, out_lab, (h, w) = a
    assert (out_lab[h:] == IGNORE).all() and (out_lab[:, w:] == IGNORE).all() and (out[h:] == 0).all()
    # a coloured class's pixels are that colour (the dataset's red / green / blue), before photometry
    for c, channel in ((1, 0), (2, 1), (3, 2)):
        px = out[:h, :w][out_lab[:h, :w] == c].astype(int)
        if len(px) > 50:
            assert np.median(px[:, channel]) > np.median(np.delete(px, channel, axis=1))


def _curve(d, key="loss"):
    return [json.loads(line)[key] for line in open(d / "metrics.jsonl")]


def _state(d):
    with open(d / "checkpoint.msgpack", "rb") as f:
        return traverse_util.flatten_dict(serialization.msgpack_restore(f.read())["state"], sep="/")


def test_finetune_seg_learns_resumes_exactly_and_exports_for_transformers(shapes, start, tmp_path):
    (tmp_path / "classes.txt").write_text("background\nred\ngreen\nblue\n")
    common = ["--data", shapes, "--model", start, "--classes", tmp_path / "classes.txt", "--batch-size", "8",
              "--steps", "24", "--warmup-steps", "4", "--lr", "2e-3", "--checkpoint-every", "5", "--no-progress"]
    full = cli("finetune-seg", *common, "--output", tmp_path / "full")
    assert full.returncode == 0, full.stderr
    assert "training image skipped (weight 0)" in full.stderr and "training_0000.jpg" in full.stderr
    part = cli("finetune-seg", *common, "--output", tmp_path / "part", "--max-steps", "12")
    assert part.returncode == 0, part.stderr
    assert not (tmp_path / "part" / "model").exists()  # not done: nothing exported

    # 8 devices, the first 8 steps (BatchNorm statistics are the global batch's, as SyncBN)
    dev8 = run_cli("finetune-seg", *common, "--output", tmp_path / "dev8", "--max-steps", "8", "--val-split", "none",
                   devices=8)
    assert dev8.returncode == 0, dev8.stderr[-3000:]
    # Every step's loss and pixel accuracy agree (with BatchNorm over each device's rows instead, they
    # would not from step 1). Not further, nor the states: the FPN deconvs' biases feed BatchNorm, so
    # their gradient is 0 but for rounding, which Adam scales up to +-lr; from ~step 9 that noise
    # (different for any summation order) reaches the loss at 1e-5 and every weight.
    for key in ("loss", "pixel_acc"):
        np.testing.assert_allclose(_curve(tmp_path / "dev8", key), _curve(tmp_path / "part", key)[:8], rtol=1e-5)
    assert json.loads(dev8.stdout.strip().splitlines()[-1])["devices"] == 8

    other = cli("finetune-seg", *common, "--output", tmp_path / "part", "--resume", "--lr", "1e-3")
    assert other.returncode == 2 and "lr: checkpoint 0.002, now 0.001" in other.stderr
    resumed = cli("finetune-seg", *common, "--output", tmp_path / "part", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    np.testing.assert_allclose(_curve(tmp_path / "part"), _curve(tmp_path / "full"), rtol=1e-5, atol=1e-6)
    a, b = _state(tmp_path / "full"), _state(tmp_path / "part")
    for k in a:
        if k.startswith(("params/", "batch_stats/")):
            np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6, err_msg=k)

    # mIoU on the held-out images rose well above the start's (fresh 4-class heads)
    before_model, before_vars = create_segmentation_model(start, num_classes=4)
    before = seg.evaluate_segmenter(before_model, before_vars, list_segmentation_folder(str(shapes), "validation"))
    after = [json.loads(line) for line in open(tmp_path / "full" / "eval.jsonl")][-1]
    assert after["step"] == 24 and after["mIoU"] > before["mIoU"] + 0.25, (before["mIoU"], after["mIoU"])
    assert set(after["per_class"]) == {"background", "red", "green", "blue"}

    # the export: transformers loads it with the same logits, and the class names
    from transformers import BeitForSemanticSegmentation

    model, variables = create_segmentation_model(str(tmp_path / "full" / "model"))
    hf = BeitForSemanticSegmentation.from_pretrained(tmp_path / "full" / "model").eval()
    assert hf.config.id2label[3] == "blue" and model.config.label_names[1] == "red"
    x = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
    with torch.no_grad():
        want = hf(torch.from_numpy(x).permute(0, 3, 1, 2)).logits.permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(jax.jit(model.apply)(variables, x)), want, atol=1e-4, rtol=1e-4)
    again = cli("finetune-seg", *common, "--output", tmp_path / "full")
    assert again.returncode == 2 and "already holds a fine-tuning run" in again.stderr
