"""beit_jax.conversion: timm -> Flax -> timm round trips, real-image verification, and refusals.

The tiny `test_beit` runs what needs no full-size numbers; beitv2_large runs the full round trip."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from beit_jax import checkpoints
from beit_jax.registry import ARCHITECTURES
from tests.support import TINY, max_abs, random_images, run_cli, run_module, timm_model, timm_state_dict, to_nchw


@pytest.mark.parametrize("arch", [TINY, pytest.param("beitv2_base_patch16_224", marks=pytest.mark.slow)])
def test_round_trip_with_10_class_head(arch, tmp_path, imagenet_dir):
    import timm

    tm = timm_model(arch, num_classes=10)
    sd = timm_state_dict(tm)
    src = tmp_path / "src.safetensors"
    checkpoints.save_safetensors(sd, src)
    res = run_module("beit_jax.conversion.timm_to_flax", src, "--model", arch, "-o", tmp_path / "flax",
                     "--verify", "--images", imagenet_dir, "--num-images", "8")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "top1_agreement: 1" in res.stdout and "OK: max abs difference" in res.stdout
    assert (tmp_path / "flax.msgpack").is_file() and (tmp_path / "flax.json").is_file()

    res = run_module("beit_jax.conversion.flax_to_timm", tmp_path / "flax.msgpack", "-o", tmp_path / "back.safetensors",
                     "--verify")
    assert res.returncode == 0, res.stdout + res.stderr
    back = checkpoints.load_state_dict_file(tmp_path / "back.safetensors")
    assert set(back) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
    spec = ARCHITECTURES[arch]
    again = timm.create_model(spec.timm_name, pretrained=True, **dict(spec.timm_kwargs, num_classes=10),
                              pretrained_cfg_overlay=dict(file=str(tmp_path / "back.safetensors"), num_classes=10)).eval()
    x = to_nchw(random_images(2, spec.fields["img_size"]))
    with torch.no_grad():
        assert max_abs(again(x).numpy(), tm(x).numpy()) == 0.0


def test_original_release_pth_nesting(tmp_path):
    """Original microsoft/unilm releases: {'model': sd} with relative_position_index buffers."""
    tm = timm_model(TINY)
    sd = {k: torch.from_numpy(v) for k, v in timm_state_dict(tm).items()}
    for i in range(2):
        sd[f"blocks.{i}.attn.relative_position_index"] = torch.zeros(17, 17, dtype=torch.long)
    torch.save({"model": sd, "optimizer": {}, "epoch": 30}, tmp_path / "release.pth")
    res = run_module("beit_jax.conversion.timm_to_flax", tmp_path / "release.pth", "--model", TINY,
                     "-o", tmp_path / "out", "--verify")
    assert res.returncode == 0, res.stderr
    assert "random inputs only" in res.stdout
    import beit_jax
    model, variables = beit_jax.create_model(TINY, checkpoint_path=str(tmp_path / "out.msgpack"))
    x = random_images(1, 64)
    with torch.no_grad():
        assert max_abs(model.apply(variables, x), tm(to_nchw(x)).numpy()) < 1e-4


def _assert_refused(res, out_prefix, *fragments):
    assert res.returncode != 0
    for f in fragments:
        assert f in res.stderr, res.stderr
    assert not any(p.name.startswith(out_prefix.name) for p in out_prefix.parent.iterdir()), \
        list(out_prefix.parent.iterdir())


def test_wrong_architecture_is_refused_and_nothing_written(tmp_path):
    src = tmp_path / "base.safetensors"
    checkpoints.save_safetensors(timm_state_dict(timm_model("beit_base_patch16_224")), src)
    res = run_module("beit_jax.conversion.timm_to_flax", src, "--model", TINY, "-o", tmp_path / "out")
    _assert_refused(res, tmp_path / "out", "does not fit test_beit",
                    "cls_token: checkpoint (1, 1, 768) -> model expects (1, 1, 64)",
                    "it fits beit_base_patch16_224")


def test_truncated_file_is_refused(tmp_path):
    src = tmp_path / "w.pth"
    torch.save({k: torch.from_numpy(v) for k, v in timm_state_dict(timm_model(TINY)).items()}, src)
    src.write_bytes(src.read_bytes()[:50_000])
    res = run_module("beit_jax.conversion.timm_to_flax", src, "--model", TINY, "-o", tmp_path / "out")
    _assert_refused(res, tmp_path / "out", "w.pth", "weights-only")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_carrying_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    src = tmp_path / "evil.pth"
    with open(src, "wb") as f:
        pickle.dump({"model": {"cls_token": _Payload(marker)}}, f)
    res = run_module("beit_jax.conversion.timm_to_flax", src, "--model", TINY, "-o", tmp_path / "out")
    _assert_refused(res, tmp_path / "out", "evil.pth", "weights_only=True")
    assert not marker.exists()


def test_cli_convert_entry_point(tmp_path):
    src = tmp_path / "w.safetensors"
    checkpoints.save_safetensors(timm_state_dict(timm_model(TINY)), src)
    res = run_cli("convert", src, "--model", TINY, "--num-classes", "0", "-o", tmp_path / "feat")
    assert res.returncode == 0, res.stderr
    import beit_jax
    model, v = beit_jax.create_model(TINY, checkpoint_path=str(tmp_path / "feat.msgpack"))
    assert model.num_classes == 0 and "head" not in v["params"]
    helped = run_cli("convert", "--help")
    assert helped.returncode == 0 and "--verify" in helped.stdout and "--images" in helped.stdout
