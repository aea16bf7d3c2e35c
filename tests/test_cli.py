"""The `beit-jax` command as a user runs it (a real subprocess where a process boundary matters)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import beit_jax
from beit_jax import checkpoints
from tests.support import TINY, cli, extract_cli, run_cli, sample_photos, timm_model, timm_state_dict


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


# ---- refusals are sentences; flags checked when parsing -----------------------------------------
def test_classify_uses_the_checkpoints_classes(ft10, imagenet_dir, tmp_path):
    _, path = ft10
    img = sample_photos(imagenet_dir, 1)[0]
    res = cli("classify", img, "--model", TINY, "--checkpoint", path, "--top-k", "3")
    assert res.returncode == 0, res.stderr
    assert "no class names for a 10-class head: showing indices" in res.stderr
    assert "tench, Tinca tinca" not in res.stdout  # no ImageNet labels on a 10-class head
    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"digit {i}" for i in range(10)) + "\n")
    res = cli("classify", img, "--model", TINY, "--checkpoint", path, "--class-names", names, "--json")
    assert res.returncode == 0, res.stderr
    assert all(r["label"].startswith("digit ") for r in json.loads(res.stdout)[0]["top_k"])
    names.write_text("a\nb\n")
    res = cli("classify", img, "--model", TINY, "--checkpoint", path, "--class-names", names)
    assert res.returncode == 2 and "names 2 classes but the model's head has 10" in res.stderr


@pytest.mark.parametrize("flag,value,message", [
    ("--batch-size", "-2", "must be a positive integer"),
    ("--batch-size", "0", "must be a positive integer"),
    ("--shard-size", "0", "must be a positive integer"),
    ("--num-classes", "-3", "must be 0 or more"),
    ("--workers", "-1", "must be 0 or more"),
    ("--decode", "quick", "argument --decode: invalid choice: 'quick' (choose from 'exact', 'fast')"),
])
def test_bad_numbers_are_refused_when_parsing(flag, value, message, tmp_path):
    res = extract_cli(tmp_path, "--output", tmp_path / "o", flag, value)
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "o").exists()


def test_refusals_are_sentences(tmp_path, imagenet_dir):
    res = cli("classify", sample_photos(imagenet_dir, 1)[0], "--top-k", "0", "--random-weights", "--model", TINY)
    assert res.returncode == 2 and "must be a positive integer" in res.stderr
    with pytest.raises(ValueError, match="img_size 100 is not a positive multiple of the patch size 16"):
        beit_jax.create_model(TINY, img_size=100)
    with pytest.raises(ValueError, match="num_classes must be 0"):
        beit_jax.create_model(TINY, num_classes=-3)

    src = tmp_path / "one.txt"
    src.write_text(str(sample_photos(imagenet_dir, 1)[0]) + "\n")
    (tmp_path / "file").write_text("x")
    for out, expected in [(tmp_path / "file", "is a file, not a folder"),
                          ("/proc/beit-jax-out", "cannot write to --output /proc/beit-jax-out")]:
        res = extract_cli(src, "--output", out)
        assert res.returncode == 2 and expected in res.stderr and "Traceback" not in res.stderr, res.stderr

    ok = extract_cli(src, "--output", tmp_path / "run", "--shard-size", "8")
    assert ok.returncode == 0, ok.stderr
    res = extract_cli(src, "--output", tmp_path / "run", "--shard-size", "4", "--resume")
    assert res.returncode == 2 and "rows_per_unit (--shard-size): folder has 8, this run 4" in res.stderr
    assert "--batch-size" not in res.stderr.split("rerun with the same")[1]
    (tmp_path / "run" / "manifest.json").write_text("")
    res = extract_cli(src, "--output", tmp_path / "run", "--shard-size", "8", "--resume")
    assert res.returncode == 2 and "manifest.json is not valid JSON" in res.stderr and "Traceback" not in res.stderr

    empty = tmp_path / "empty"
    empty.mkdir()
    res = extract_cli(empty, "--output", tmp_path / "o2")
    assert res.returncode == 2 and "no images found" in res.stderr


def test_convert_into_a_missing_folder(tmp_path, ft10):
    _, path = ft10
    res = cli("convert", path, "--model", TINY, "-o", tmp_path / "new" / "sub" / "ft10")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "new" / "sub" / "ft10.msgpack").is_file()
