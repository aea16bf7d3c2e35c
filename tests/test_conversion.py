"""conversion/ (installed as beit_jax.conversion): timm -> Flax -> timm round trips, real-image
verification, file names, and refusals.

The tiny `test_beit` runs what needs no full-size numbers; beitv2_base runs the full round trip. The
tiny round trip runs the tools as a user of a checkout does (`python -m conversion.timm_to_flax` in
the checkout); the full-size one and the refusals run in-process (`main([...])`, the same code
`beit-jax convert` calls)."""
from __future__ import annotations

import os
import pickle
import shutil

import numpy as np
import pytest
import torch

import beit_jax
from beit_jax import checkpoints
from beit_jax.conversion import flax_to_timm, timm_to_flax
from beit_jax.models import ARCHITECTURES
from tests.support import (ROOT, TINY, as_tensors, max_abs, random_images, run_cli, run_module, timm_model, timm_state_dict,
                           to_nchw)


def _convert(capsys, tool, *args):
    """(exit code, stdout, stderr) of a conversion tool run in-process."""
    rc = tool.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("arch", [TINY, pytest.param("beitv2_base_patch16_224", marks=pytest.mark.slow)])
def test_round_trip_with_10_class_head(arch, tmp_path, imagenet_dir, capsys):
    import timm

    tm = timm_model(arch, num_classes=10)
    sd = timm_state_dict(tm)
    src = tmp_path / "src.safetensors"
    checkpoints.save_safetensors(sd, src)

    def tool(module, *args):
        # `python -m conversion.<tool>` from the checkout, as README says, on the tiny model; the
        # full-size numbers in-process (the same main(); no process boundary to test twice)
        if arch == TINY:
            res = run_module(f"conversion.{module.__name__.rsplit('.', 1)[-1]}", *args, cwd=ROOT)
            return res.returncode, res.stdout, res.stderr
        return _convert(capsys, module, *args)

    rc, out, err = tool(timm_to_flax, src, "--model", arch, "-o", tmp_path / "flax", "--verify", "--images",
                        imagenet_dir, "--num-images", "2")
    assert rc == 0, out + err
    assert "top1_agreement: 1" in out and "OK: max abs difference" in out
    assert (tmp_path / "flax.msgpack").is_file() and (tmp_path / "flax.json").is_file()

    rc, out, err = tool(flax_to_timm, tmp_path / "flax.msgpack", "-o", tmp_path / "back.safetensors", "--verify")
    assert rc == 0, out + err
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


def test_original_release_pth_nesting(tmp_path, capsys):
    """Original microsoft/unilm releases: {'model': sd} with relative_position_index buffers."""
    tm = timm_model(TINY)
    sd = as_tensors(timm_state_dict(tm))
    for i in range(2):
        sd[f"blocks.{i}.attn.relative_position_index"] = torch.zeros(17, 17, dtype=torch.long)
    torch.save({"model": sd, "optimizer": {}, "epoch": 30}, tmp_path / "release.pth")
    rc, out, err = _convert(capsys, timm_to_flax, tmp_path / "release.pth", "--model", TINY,
                            "-o", tmp_path / "out", "--verify")
    assert rc == 0, err
    assert "random inputs only" in out
    model, variables = beit_jax.create_model(TINY, checkpoint_path=str(tmp_path / "out.msgpack"))
    x = random_images(1, 64)
    with torch.no_grad():
        assert max_abs(model.apply(variables, x), tm(to_nchw(x)).numpy()) < 1e-4


def _assert_refused(res, out_prefix, *fragments):
    """Refused as README says every refusal is: exit code 2, one `error:` line naming the problem,
    nothing written under out_prefix."""
    rc, _, err = res
    assert rc == 2, (rc, err)
    assert err.startswith("error: "), err
    for f in fragments:
        assert f in err, err
    assert not any(p.name.startswith(out_prefix.name) for p in out_prefix.parent.iterdir()), \
        list(out_prefix.parent.iterdir())


def test_wrong_architecture_is_refused_and_nothing_written(tmp_path, capsys):
    src = tmp_path / "base.safetensors"
    checkpoints.save_safetensors(timm_state_dict(timm_model("beit_base_patch16_224")), src)
    res = _convert(capsys, timm_to_flax, src, "--model", TINY, "-o", tmp_path / "out")
    _assert_refused(res, tmp_path / "out", "does not fit test_beit",
                    "cls_token: checkpoint (1, 1, 768) -> model expects (1, 1, 64)",
                    "it fits beit_base_patch16_224")


def test_truncated_file_is_refused(tmp_path, capsys):
    src = tmp_path / "w.pth"
    torch.save(as_tensors(timm_state_dict(timm_model(TINY))), src)
    src.write_bytes(src.read_bytes()[:50_000])
    res = _convert(capsys, timm_to_flax, src, "--model", TINY, "-o", tmp_path / "out")
    _assert_refused(res, tmp_path / "out", "w.pth", "weights-only")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_carrying_code_is_refused(tmp_path, capsys):
    marker = tmp_path / "pwned"
    src = tmp_path / "evil.pth"
    with open(src, "wb") as f:
        pickle.dump({"model": {"cls_token": _Payload(marker)}}, f)
    res = _convert(capsys, timm_to_flax, src, "--model", TINY, "-o", tmp_path / "out")
    _assert_refused(res, tmp_path / "out", "evil.pth", "weights_only=True")
    assert not marker.exists()


def test_cli_convert_entry_point(tmp_path):
    src = tmp_path / "w.safetensors"
    checkpoints.save_safetensors(timm_state_dict(timm_model(TINY)), src)
    res = run_cli("convert", src, "--model", TINY, "--num-classes", "0", "-o", tmp_path / "feat")
    assert res.returncode == 0, res.stderr
    model, v = beit_jax.create_model(TINY, checkpoint_path=str(tmp_path / "feat.msgpack"))
    assert model.num_classes == 0 and "head" not in v["params"]
    helped = run_cli("convert", "--help")
    assert helped.returncode == 0 and "--verify" in helped.stdout and "--images" in helped.stdout


# ---- file names and refusals a user meets -------------------------------------------------------
@pytest.fixture
def tiny_export(tmp_path):
    model, variables = beit_jax.create_model(TINY, rng=1)
    path, _ = beit_jax.save_flax_checkpoint(variables, model, tmp_path / "tiny.msgpack")
    return model, variables, path


@pytest.mark.parametrize("suffix", [".pth", ".bin"])
def test_flax_to_timm_writes_the_format_the_name_says(tiny_export, tmp_path, capsys, suffix):
    """`-o finetuned.pth` is a torch pickle torch.load and timm read (it was safetensors bytes)."""
    model, variables, path = tiny_export
    out = tmp_path / f"finetuned{suffix}"
    rc, _, err = _convert(capsys, flax_to_timm, path, "-o", out)
    assert rc == 0, err
    sd = torch.load(out, weights_only=True)
    want = beit_jax.to_timm_state_dict(variables, model)
    assert list(sd) == list(want)
    for k, v in want.items():
        np.testing.assert_array_equal(sd[k].numpy(), v, err_msg=k)
    spec = ARCHITECTURES[TINY]
    import timm

    timm.create_model(spec.timm_name, pretrained=True, **dict(spec.timm_kwargs, num_classes=1000),
                      pretrained_cfg_overlay=dict(file=str(out), num_classes=1000))


def test_flax_to_timm_refuses_an_unknown_file_type(tiny_export, tmp_path, capsys):
    _, _, path = tiny_export
    _assert_refused(_convert(capsys, flax_to_timm, path, "-o", tmp_path / "out.npz"), tmp_path / "out",
                    "out.npz", "unknown file type '.npz'", ".safetensors, .pth")


def test_convert_into_a_folder_names_the_file_after_the_architecture(tmp_path, capsys):
    """`-o out/` wrote the hidden files out/.msgpack and out/.json."""
    src = tmp_path / "w.safetensors"
    checkpoints.save_safetensors(timm_state_dict(timm_model(TINY)), src)
    (tmp_path / "exists").mkdir()
    for out in (f"{tmp_path / 'new'}{os.sep}", tmp_path / "exists"):
        rc, stdout, err = _convert(capsys, timm_to_flax, src, "--model", TINY, "-o", out)
        assert rc == 0, err
        folder = tmp_path / os.path.basename(os.path.normpath(out))
        assert sorted(p.name for p in folder.iterdir()) == [f"{TINY}.json", f"{TINY}.msgpack"]
        beit_jax.create_model(TINY, checkpoint_path=str(folder / f"{TINY}.msgpack"))
    model, variables = beit_jax.create_model(TINY)
    with pytest.raises(ValueError, match="is a folder; give a file name"):
        beit_jax.save_flax_checkpoint(variables, model, tmp_path / "exists")


def test_convert_refusals_exit_2(tiny_export, tmp_path, capsys):
    """Every refusal is `error: ...` with exit code 2 (they exited 1 through SystemExit), and a
    beit-jax export given to convert is named as one, with what to do instead."""
    _, _, path = tiny_export
    _assert_refused(_convert(capsys, timm_to_flax, path, "--model", TINY, "-o", tmp_path / "out"),
                    tmp_path / "out", "tiny.msgpack is a beit-jax export, not a timm state dict",
                    "checkpoint_path=", "flax_to_timm")
    _assert_refused(_convert(capsys, timm_to_flax, tmp_path / "nope.pth", "--model", TINY, "-o", tmp_path / "out"),
                    tmp_path / "out", "nope.pth is not a file")
    _assert_refused(_convert(capsys, timm_to_flax, path, "-o", tmp_path / "out"), tmp_path / "out",
                    "pass --model ARCH")
    _assert_refused(_convert(capsys, timm_to_flax, path, "--model", TINY), tmp_path / "out", "nothing to do")
    shutil.copy(path, tmp_path / "lone.msgpack")
    _assert_refused(_convert(capsys, flax_to_timm, tmp_path / "lone.msgpack", "-o", tmp_path / "out.safetensors"),
                    tmp_path / "out", "lone.msgpack has no .json config beside it")


# ---- exports of models with overridden fields ---------------------------------------------------
def test_export_with_overridden_fields_loads_and_converts(tmp_path, capsys):
    """A depth=3 model with a shared relative position bias, exported, is rebuilt as it was by
    create_model and by flax_to_timm (both refused it as "does not fit" before)."""
    model, variables = beit_jax.create_model(TINY, depth=3, use_rel_pos_bias=False, use_shared_rel_pos_bias=True,
                                             rng=2)
    path, _ = beit_jax.save_flax_checkpoint(variables, model, tmp_path / "deep.msgpack")
    again, loaded = beit_jax.create_model(TINY, checkpoint_path=path)
    assert (again.depth, again.use_rel_pos_bias, again.use_shared_rel_pos_bias) == (3, False, True)
    x = random_images(2, 64)
    assert max_abs(again.apply(loaded, x), model.apply(variables, x)) == 0.0
    rc, out, err = _convert(capsys, flax_to_timm, path, "-o", tmp_path / "deep.safetensors", "--verify")
    assert rc == 0, err
    assert "max abs logit difference" in out


def test_convert_refuses_names_it_would_mangle_and_files_it_did_not_write(tmp_path, capsys):
    """`-o f.json` wrote f.json.msgpack + f.json.json; `-o notes` replaced the user's notes.json;
    `-o /proc/x/y` failed only after converting, with a bare errno."""
    src = tmp_path / "w.safetensors"
    checkpoints.save_safetensors(timm_state_dict(timm_model(TINY)), src)
    _assert_refused(_convert(capsys, timm_to_flax, src, "--model", TINY, "-o", tmp_path / "f.json"),
                    tmp_path / "f", "give -o without the .json suffix")
    (tmp_path / "notes.json").write_text("my notes")
    rc, out, err = _convert(capsys, timm_to_flax, src, "--model", TINY, "-o", tmp_path / "notes")
    assert rc == 2 and "notes.json exists and is not part of a beit-jax export" in err and "converted" not in out
    assert (tmp_path / "notes.json").read_text() == "my notes" and not (tmp_path / "notes.msgpack").exists()
    rc, out, err = _convert(capsys, timm_to_flax, src, "--model", TINY, "-o", "/proc/beit-jax/x")
    assert rc == 2 and "-o /proc/beit-jax/x: cannot write there" in err and "converted" not in out
    rc, _, err = _convert(capsys, timm_to_flax, src, "--model", TINY, "-o", tmp_path / "ok")
    assert rc == 0, err
    rc, _, err = _convert(capsys, timm_to_flax, src, "--model", TINY, "-o", tmp_path / "ok")  # our own: replaced
    assert rc == 0, err
    _assert_refused(_convert(capsys, flax_to_timm, tmp_path / "ok.msgpack", "-o", tmp_path), tmp_path / "back",
                    "is a folder; give a file name")
    _assert_refused(_convert(capsys, flax_to_timm, tmp_path / "ok.msgpack", "-o", tmp_path / "back.pth",
                             "--tolerance", "-1"), tmp_path / "back", "--tolerance must be > 0")
    (tmp_path / "mine.safetensors").write_bytes(b"the user's file")
    rc, _, err = _convert(capsys, flax_to_timm, tmp_path / "ok.msgpack", "-o", tmp_path / "mine.safetensors")
    assert rc == 2 and "exists: it is not overwritten" in err
    assert (tmp_path / "mine.safetensors").read_bytes() == b"the user's file"
