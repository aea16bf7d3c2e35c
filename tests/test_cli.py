"""The `beit-jax` command as a user runs it (a real subprocess)."""
from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image

from beit_jax import checkpoints
from tests.support import TINY, cli, run_cli, timm_model, timm_state_dict


def test_classify_matches_timm_top5(tmp_path, imagenet_dir):
    from timm.data import create_transform, resolve_model_data_config

    tm = timm_model(TINY)
    ckpt = tmp_path / "w.safetensors"
    checkpoints.save_safetensors(timm_state_dict(tm), ckpt)
    images = sorted(imagenet_dir.iterdir())[:3]
    res = run_cli("classify", *images, "--model", TINY, "--checkpoint", ckpt, "--json", "--top-k", "5")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    tf = create_transform(**dict(resolve_model_data_config(tm), input_size=(3, 64, 64)))  # the tiny model's size
    for path, entry in zip(images, out):
        with torch.no_grad():
            probs = tm(tf(Image.open(path).convert("RGB"))[None]).softmax(-1)[0].numpy()
        assert [r["index"] for r in entry["top_k"]] == list(np.argsort(-probs)[:5])
        np.testing.assert_allclose([r["prob"] for r in entry["top_k"]], np.sort(probs)[::-1][:5], atol=1e-5)
    assert out[0]["top_k"][0]["label"]  # a readable ImageNet name


def test_classify_labels_and_bad_image(tmp_path, odd_dir):
    res = cli("classify", odd_dir / "hopper.jpg", odd_dir / "broken.png", "--random-weights",
              "--model", "beit_base_patch16_224.in22k_ft_in22k", "--top-k", "2")
    assert res.returncode == 1
    assert "broken.png" in res.stderr and "cannot identify image file" in res.stderr
    assert "hopper.jpg" in res.stdout and res.stdout.count("%") == 2


def test_classify_without_hub_explains(tmp_path, odd_dir):
    res = run_cli("classify", odd_dir / "hopper.jpg",
                  env_extra=dict(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "c"), HF_HOME=str(tmp_path)))
    assert res.returncode == 2
    assert "--checkpoint FILE" in res.stderr and "HF_HOME" in res.stderr


def test_bench_reports_throughput_and_what_ran():
    res = run_cli("bench", "--model", TINY, "--batch-size", "2", "16", "--seconds", "0.3", "--attn-impl", "cudnn")
    assert res.returncode == 0, res.stderr
    assert "GFLOP/image" in res.stdout and "batch    2:" in res.stdout and "img/s" in res.stdout
    assert "test_beit float32 on 1 x cpu" in res.stdout
    assert "attention: xla (cuDNN attention needs an NVIDIA GPU" in res.stdout  # asked for, said why not
    assert res.stderr.count("attn_impl='cudnn' cannot run here") == 1  # one warning, not one per layer
    assert "whole batch" in res.stdout and "micro-batches of 8" in res.stdout  # batch 2 / batch 16
