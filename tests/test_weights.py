"""Checkpoint conversion both ways, files, the Hub path and the errors a user sees."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

import beit_jax
from beit_jax import checkpoints
from beit_jax.factory import NewHeadWarning
from tests.support import (TINY, as_tensors, assert_round_trip_is_identity, cli, max_abs, random_images, sample_photos, subprocess_env,
                           timm_model, timm_state_dict, to_nchw)


def test_round_trip_is_identity_and_timm_loads_it():
    assert_round_trip_is_identity("beit_base_patch16_224")


def test_large_checkpoint_into_base_is_refused_with_details():
    import timm

    with torch.device("meta"):  # timm's keys and shapes; the values do not matter to a refusal
        sd = {k: np.zeros(v.shape, np.float32) for k, v in timm.create_model("beit_large_patch16_224").state_dict().items()}
    model = beit_jax.build_model("beit_base_patch16_224")
    with pytest.raises(beit_jax.CheckpointMismatchError) as err:
        beit_jax.convert_timm_state_dict(sd, model)
    msg = str(err.value)
    assert "nothing was loaded" in msg
    assert "cls_token: checkpoint (1, 1, 1024) -> model expects (1, 1, 768)" in msg
    assert "unexpected keys (192)" in msg and "blocks.12.attn.qkv.weight" in msg
    assert "embed_dim=1024, depth=24 (large)" in msg
    assert "it fits beit_large_patch16_224 or beitv2_large_patch16_224" in msg


def test_missing_and_foreign_keys_are_listed():
    sd = timm_state_dict(timm_model("beit_base_patch16_224"))
    del sd["blocks.4.mlp.fc2.bias"]
    sd["mask_token"] = np.zeros((1, 1, 768), np.float32)
    sd["blocks.0.attn.relative_position_index"] = np.zeros((197, 197), np.int64)  # old buffers: dropped
    with pytest.raises(beit_jax.CheckpointMismatchError, match=r"(?s)missing keys \(1\).*blocks.4.mlp.fc2.bias.*"
                                                              r"unexpected keys \(1\).*mask_token"):
        beit_jax.convert_timm_state_dict(sd, beit_jax.build_model("beit_base_patch16_224"))


def test_checkpoint_files_pth_nesting_and_new_head(tmp_path):
    name = "beitv2_base_patch16_224"
    tm = timm_model(name)
    sd = timm_state_dict(tm)
    pth = tmp_path / "release.pth"
    torch.save({"model": as_tensors(sd), "epoch": 3}, pth)
    model, variables = beit_jax.create_model(name, checkpoint_path=str(pth))
    x = random_images(1, 224)
    with torch.no_grad():
        assert max_abs(model.apply(variables, x), tm(to_nchw(x)).numpy()) < 1e-4

    model10, v10 = beit_jax.create_model(name, checkpoint_path=str(pth), num_classes=10, rng=3)
    assert v10["params"]["head"]["kernel"].shape == (768, 10)
    assert float(np.abs(v10["params"]["head"]["kernel"]).max()) < 0.001  # timm's head_init_scale
    np.testing.assert_array_equal(v10["params"]["blocks_5"]["mlp"]["fc1"]["kernel"],
                                  variables["params"]["blocks_5"]["mlp"]["fc1"]["kernel"])


def test_save_safetensors_is_read_by_safetensors_and_torch(tmp_path):
    """The streamed writer: what safetensors' own readers (numpy and torch) read back, every dtype
    a state dict holds, 0-d, empty, transposed and big-endian arrays included."""
    import ml_dtypes
    from safetensors import safe_open
    from safetensors.numpy import load_file
    from safetensors.torch import load_file as load_torch

    rng = np.random.default_rng(0)
    sd = {"blocks.0.attn.qkv.weight": rng.normal(size=(12, 4)).astype(np.float32), "step": np.array(3, np.int64),
          "scale": np.array(0.5, np.float32), "empty": np.zeros((0, 4), np.float32),
          "transposed": rng.normal(size=(4, 6)).astype(np.float32).T, "mask": np.array([True, False, True]),
          "u8": np.arange(5, dtype=np.uint8), "f16": rng.normal(size=(2, 3)).astype(np.float16),
          "big_endian": np.arange(3, dtype=">i4")}
    path = tmp_path / "w.safetensors"
    beit_jax.save_safetensors(sd, path, metadata={"format": "pt", "note": "x"})
    back = load_file(path)
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert back[k].shape == v.shape and back[k].dtype == v.dtype.newbyteorder("="), k
        np.testing.assert_array_equal(back[k], v, err_msg=k)
    with safe_open(path, "np") as f:
        assert f.metadata() == {"format": "pt", "note": "x"}
    assert load_torch(path)["scale"].shape == ()
    bf = rng.normal(size=(3, 2)).astype(ml_dtypes.bfloat16)
    beit_jax.save_safetensors({"w": bf}, tmp_path / "bf16.safetensors")
    assert load_torch(tmp_path / "bf16.safetensors")["w"].dtype == torch.bfloat16
    np.testing.assert_array_equal(load_torch(tmp_path / "bf16.safetensors")["w"].float().numpy(), bf.astype(np.float32))
    with pytest.raises(ValueError, match="complex64"):
        beit_jax.save_safetensors({"z": np.zeros(2, np.complex64)}, tmp_path / "z.safetensors")
    assert not (tmp_path / "z.safetensors").exists()


def test_bad_files_name_the_file(tmp_path):
    good = tmp_path / "good.safetensors"
    checkpoints.save_safetensors(timm_state_dict(timm_model("beit_base_patch16_224")), good)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: 10_000])
    with pytest.raises(ValueError, match="truncated.safetensors"):
        beit_jax.create_model("beit_base_patch16_224", checkpoint_path=str(truncated))
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        beit_jax.create_model("beit_base_patch16_224", checkpoint_path=str(tmp_path / "nope.safetensors"))
    with pytest.raises(ValueError, match="unsupported checkpoint type '.npz'"):
        checkpoints.load_state_dict_file(_touch(tmp_path / "w.npz"))


def _touch(p: Path) -> Path:
    p.write_bytes(b"x")
    return p


def test_flax_msgpack_export_loads_back(tmp_path):
    name = "beit_base_patch16_224"
    model, variables = beit_jax.create_model(name, num_classes=7, rng=1)
    mp, js = beit_jax.save_flax_checkpoint(variables, model, tmp_path / "ft")
    assert json.loads(Path(js).read_text())["num_classes"] == 7
    model2, v2 = beit_jax.create_model(name, num_classes=7, checkpoint_path=mp)
    x = random_images(1, 224)
    assert max_abs(model.apply(variables, x), model2.apply(v2, x)) == 0.0


def test_flax_export_is_read_in_flax_names_and_resized_like_timm_weights(tmp_path):
    """A .msgpack export is fitted in its own (Flax) names: another img_size resizes its tables
    exactly as the timm-key path does, and a foreign entry is named as stored."""
    model, variables = beit_jax.create_model("test_beit", num_classes=5, rng=2)
    variables = jax.tree_util.tree_map(lambda a: np.asarray(a) + 0.01, variables)  # non-zero tables
    mp, _ = beit_jax.save_flax_checkpoint(variables, model, tmp_path / "tiny")
    big, from_flax = beit_jax.create_model("test_beit", img_size=96, checkpoint_path=mp)
    from_timm = beit_jax.convert_timm_state_dict(beit_jax.to_timm_state_dict(variables, model), big)
    for a, b in zip(jax.tree_util.tree_leaves(from_flax), jax.tree_util.tree_leaves(from_timm)):
        np.testing.assert_array_equal(a, b)
    assert from_flax["params"]["blocks_0"]["attn"]["relative_position_bias_table"].shape == (11 * 11 + 3, 2)

    extra = dict(variables["params"], blocks_0=dict(variables["params"]["blocks_0"], foo=np.zeros(3)))
    beit_jax.save_flax_checkpoint({"params": extra}, model, tmp_path / "extra")
    with pytest.raises(beit_jax.CheckpointMismatchError, match=r"unexpected keys \(1\):\n    blocks_0/foo"):
        beit_jax.create_model("test_beit", checkpoint_path=str(tmp_path / "extra.msgpack"))


def _build_hf_cache(cache: Path, repo_id: str, sd: dict) -> None:
    """The layout huggingface_hub's cache uses: blobs, a snapshot per commit, refs/main."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True)
    checkpoints.save_safetensors(sd, snap / "model.safetensors")
    (snap / "config.json").write_text(json.dumps({"architecture": repo_id.split("/")[1].split(".")[0]}))
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)


def _run_offline(code: str, cache: Path) -> subprocess.CompletedProcess:
    env = subprocess_env(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), HF_HOME=str(cache.parent / "hf_home"))
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)


def test_pretrained_from_hub_cache_offline(tmp_path):
    """pretrained=True goes through huggingface_hub: a cache built here serves it with HF_HUB_OFFLINE=1."""
    name = "beit_base_patch16_224"
    tm = timm_model(name)
    cache = tmp_path / "hub"
    _build_hf_cache(cache, "timm/beit_base_patch16_224.in22k_ft_in22k_in1k", timm_state_dict(tm))
    x = random_images(1, 224, seed=9)
    np.save(tmp_path / "x.npy", x)
    code = (
        "import numpy as np, sys, beit_jax\n"
        f"m, v = beit_jax.create_model('{name}', pretrained=True)\n"
        f"np.save(r'{tmp_path / 'out.npy'}', np.asarray(m.apply(v, np.load(r'{tmp_path / 'x.npy'}'))))\n"
        "print('torch imported:', 'torch' in sys.modules)\n")
    res = _run_offline(code, cache)
    assert res.returncode == 0, res.stderr
    assert "torch imported: False" in res.stdout
    with torch.no_grad():
        ref = tm(to_nchw(x)).numpy()
    assert max_abs(np.load(tmp_path / "out.npy"), ref) < 1e-4


def test_pretrained_unreachable_says_what_to_do(tmp_path):
    res = _run_offline("import beit_jax; beit_jax.create_model('beitv2_base_patch16_224', pretrained=True)",
                       tmp_path / "empty-cache")
    assert res.returncode != 0
    assert "PretrainedUnavailableError" in res.stderr
    assert "timm/beitv2_base_patch16_224.in1k_ft_in22k_in1k" in res.stderr
    assert "`checkpoint_path=FILE`" in res.stderr and "--checkpoint" not in res.stderr  # Python names (the CLI's: test_cli)


def test_import_does_not_import_torch():
    """Every public name (loaded on first use) and every module of the library, without torch or
    timm; and what a decode worker process imports (beit_jax.data) without JAX either."""
    def loaded(code):
        res = subprocess.run([sys.executable, "-c", f"import sys; {code}; print(sorted({{m.split('.')[0] for m in "
                              f"sys.modules}} & {{'torch', 'timm', 'jax', 'flax'}}))"],
                             capture_output=True, text=True, env=subprocess_env())
        assert res.returncode == 0, res.stderr
        return res.stdout.strip()

    assert loaded("import beit_jax, beit_jax.cli, beit_jax.extract, beit_jax.finetune, beit_jax.elastic; "
                  "[getattr(beit_jax, n) for n in beit_jax.__all__]") == "['flax', 'jax']"
    assert loaded("import beit_jax.data") == "[]"


def test_registry_matches_timm():
    import timm

    ours = set(beit_jax.list_models("beit*", pretrained=True))
    theirs = set(timm.list_models("beit*", pretrained=True))  # BEiT v1, v2 and BEiT-3
    assert ours == theirs and any(n.startswith("beit3") for n in ours)
    assert set(beit_jax.list_models("beit*")) == set(timm.list_models("beit*"))
    untrained = [n for n in beit_jax.list_models("beit*") if not beit_jax.get_pretrained_cfg(n).has_weights]
    assert untrained == ["beit3_giant_patch14_224", "beit3_giant_patch14_336"]
    for name in sorted(ours) + beit_jax.list_models("beit*"):
        tcfg = timm.models.get_pretrained_cfg(name) if "." in name else \
            timm.create_model(name, pretrained=False, depth=1).pretrained_cfg
        cfg = beit_jax.get_pretrained_cfg(name)
        if "." not in name:
            assert cfg.tag == tcfg["tag"], f"default tag of {name}"
        tcfg = tcfg if isinstance(tcfg, dict) else tcfg.to_dict()
        assert cfg.hf_hub_id == tcfg.get("hf_hub_id")  # None: timm lists no weights (giant)
        assert cfg.num_classes == tcfg["num_classes"]
        assert tuple(cfg.input_size) == tuple(tcfg["input_size"])
        assert cfg.crop_pct == tcfg["crop_pct"] and cfg.interpolation == tcfg["interpolation"]
        assert tuple(cfg.mean) == tuple(tcfg["mean"]) and tuple(cfg.std) == tuple(tcfg["std"])


def test_unknown_names_are_clear():
    with pytest.raises(ValueError, match="unknown BEiT architecture 'beit_huge_patch14_224'"):
        beit_jax.create_model("beit_huge_patch14_224")
    with pytest.raises(ValueError, match="known tags: in22k_ft_in22k_in1k"):
        beit_jax.create_model("beit_base_patch16_224.in1k")


# ---- a checkpoint decides its head; exports keep their architecture; no NaN ---------------------
def test_checkpoint_head_is_kept_by_default_and_replaced_only_loudly(ft10):
    tm, path = ft10
    model, variables = beit_jax.create_model(TINY, checkpoint_path=str(path))
    assert model.num_classes == 10  # not the tag's 1000
    x = random_images(2, 64)
    with torch.no_grad():
        assert max_abs(model.apply(variables, x), tm(to_nchw(x)).numpy()) < 1e-4
    with pytest.warns(NewHeadWarning, match="10-class head; the model gets a NEW RANDOM 1000-class head"):
        other, _ = beit_jax.create_model(TINY, checkpoint_path=str(path), num_classes=1000)
    assert other.num_classes == 1000


def test_export_under_another_architecture_is_refused(tmp_path):
    model, variables = beit_jax.create_model("beitv2_base_patch16_224", num_classes=3, depth=1)
    mp, _ = beit_jax.save_flax_checkpoint(variables, model, tmp_path / "v2")
    with pytest.raises(ValueError, match=r"exported from beitv2_base_patch16_224\.in1k_ft_in22k_in1k, not "
                                         r"beit_base_patch16_224.*`model=beitv2_base_patch16_224\.in1k_ft_in22k_in1k`"):
        beit_jax.create_model("beit_base_patch16_224", checkpoint_path=mp, depth=1)
    again, _ = beit_jax.create_model("beitv2_base_patch16_224", checkpoint_path=mp, depth=1)
    assert again.pretrained_cfg.mean == (0.485, 0.456, 0.406)  # v2's data config, kept


def test_non_finite_weights_are_refused(ft10, tmp_path, imagenet_dir):
    tm, _ = ft10
    sd = timm_state_dict(tm)
    sd["blocks.1.mlp.fc1.weight"] = bad_weight = sd["blocks.1.mlp.fc1.weight"].copy()
    bad_weight[0, :3] = [np.nan, np.inf, -np.inf]
    bad = tmp_path / "nan.safetensors"
    checkpoints.save_safetensors(sd, bad)
    with pytest.raises(beit_jax.CheckpointMismatchError, match=r"NaN or Inf values in 1 tensors: "
                                                               r"blocks\.1\.mlp\.fc1\.weight \(3 of"):
        beit_jax.create_model(TINY, checkpoint_path=str(bad))
    res = cli("classify", sample_photos(imagenet_dir, 1)[0], "--model", TINY, "--checkpoint", bad)
    assert res.returncode == 2 and "NaN or Inf" in res.stderr and "nan%" not in res.stdout
