"""The `beit-jax` command as a user runs it (a real subprocess where a process boundary matters)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import beit_jax
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


def test_library_errors_name_parameters_and_the_command_says_flags(tmp_path, imagenet_dir):
    """The library speaks Python (`shard_size`, `resume=True`); the command maps those names to
    its flags in one place (cli.options.to_cli), so a Python user is never told to pass --resume."""
    from beit_jax.cli.options import to_cli
    from beit_jax.extract import OutputMismatchError, extract

    src = [str(p) for p in sorted(imagenet_dir.iterdir())[:2]]
    model, variables = beit_jax.create_model(TINY, num_classes=0)
    extract(src, str(tmp_path / "o"), model, variables, shard_size=8, progress=False)
    with pytest.raises(OutputMismatchError) as e:
        extract(src, str(tmp_path / "o"), model, variables, shard_size=4, progress=False)
    said = str(e.value)
    assert "rows_per_unit (`shard_size`): folder has 8, this run 4" in said and "--" not in said
    res = cli("extract", *src, "--output", tmp_path / "o", "--model", TINY, "--random-weights", "--num-classes",
              "0", "--shard-size", "4", "--no-progress")
    assert res.returncode == 2 and "rows_per_unit (--shard-size): folder has 8, this run 4" in res.stderr
    assert "another --output" in res.stderr and "`" not in res.stderr
    assert to_cli("pass `resume=True, verify=True` or `batch_size=96`; `unknown_name` stays") == \
        "pass --resume --verify or --batch-size 96; `unknown_name` stays"
