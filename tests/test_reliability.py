"""Nothing silently wrong, nothing of the user's deleted, every refusal clear: each test reproduces
one failure a hostile user met (issue 15) and checks what they see now."""
from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import beit_jax
from beit_jax import checkpoints
from beit_jax.extract import extract, read_failures, read_features
from beit_jax.factory import NewHeadWarning
from beit_jax.sinks import CorruptOutputError
from tests.support import (TINY, cli, cli_command, digits_folder, max_abs, probe_new_outputs, random_images,
                           run_cli, subprocess_env, timm_model, timm_state_dict, to_nchw)


def _extract_cli(*args):
    """`beit-jax extract ... --model test_beit --random-weights`, in-process (no boundary under test)."""
    return cli("extract", *args, "--model", TINY, "--random-weights", "--no-progress")


def _photos(imagenet_dir, n):
    return sorted(imagenet_dir.iterdir())[:n]


# ---- 1, 2, 7: checkpoints decide their head; exports keep their architecture; no NaN -------------
@pytest.fixture(scope="module")
def ft10(tmp_path_factory):
    """A timm checkpoint fine-tuned to 10 classes (perturbed random weights)."""
    tm = timm_model(TINY, num_classes=10)
    path = tmp_path_factory.mktemp("ft10") / "ft10.safetensors"
    checkpoints.save_safetensors(timm_state_dict(tm), path)
    return tm, path


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


def test_classify_uses_the_checkpoints_classes(ft10, imagenet_dir, tmp_path):
    _, path = ft10
    img = _photos(imagenet_dir, 1)[0]
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
    sd["blocks.1.mlp.fc1.weight"][0, :3] = [np.nan, np.inf, -np.inf]
    bad = tmp_path / "nan.safetensors"
    checkpoints.save_safetensors(sd, bad)
    with pytest.raises(beit_jax.CheckpointMismatchError, match=r"NaN or Inf values in 1 tensors: "
                                                               r"blocks\.1\.mlp\.fc1\.weight \(3 of"):
        beit_jax.create_model(TINY, checkpoint_path=str(bad))
    res = cli("classify", _photos(imagenet_dir, 1)[0], "--model", TINY, "--checkpoint", bad)
    assert res.returncode == 2 and "NaN or Inf" in res.stderr and "nan%" not in res.stdout


# ---- 4, 13: flags and sentences -----------------------------------------------------------------
@pytest.mark.parametrize("flag,value,message", [
    ("--batch-size", "-2", "must be a positive integer"),
    ("--batch-size", "0", "must be a positive integer"),
    ("--shard-size", "0", "must be a positive integer"),
    ("--num-classes", "-3", "must be 0 or more"),
    ("--workers", "-1", "must be 0 or more"),
])
def test_bad_numbers_are_refused_when_parsing(flag, value, message, tmp_path):
    res = _extract_cli(tmp_path, "--output", tmp_path / "o", flag, value)
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "o").exists()


def test_refusals_are_sentences(tmp_path, imagenet_dir):
    res = cli("classify", _photos(imagenet_dir, 1)[0], "--top-k", "0", "--random-weights", "--model", TINY)
    assert res.returncode == 2 and "must be a positive integer" in res.stderr
    with pytest.raises(ValueError, match="img_size 100 is not a positive multiple of the patch size 16"):
        beit_jax.create_model(TINY, img_size=100)
    with pytest.raises(ValueError, match="num_classes must be 0"):
        beit_jax.create_model(TINY, num_classes=-3)

    src = tmp_path / "one.txt"
    src.write_text(str(_photos(imagenet_dir, 1)[0]) + "\n")
    (tmp_path / "file").write_text("x")
    for out, expected in [(tmp_path / "file", "is a file, not a folder"),
                          ("/proc/beit-jax-out", "cannot write to --output /proc/beit-jax-out")]:
        res = _extract_cli(src, "--output", out)
        assert res.returncode == 2 and expected in res.stderr and "Traceback" not in res.stderr, res.stderr

    ok = _extract_cli(src, "--output", tmp_path / "run", "--shard-size", "8")
    assert ok.returncode == 0, ok.stderr
    res = _extract_cli(src, "--output", tmp_path / "run", "--shard-size", "4", "--resume")
    assert res.returncode == 2 and "rows_per_unit (--shard-size): folder has 8, this run 4" in res.stderr
    assert "--batch-size" not in res.stderr.split("rerun with the same")[1]
    (tmp_path / "run" / "manifest.json").write_text("")
    res = _extract_cli(src, "--output", tmp_path / "run", "--shard-size", "8", "--resume")
    assert res.returncode == 2 and "manifest.json is not valid JSON" in res.stderr and "Traceback" not in res.stderr

    empty = tmp_path / "empty"
    empty.mkdir()
    res = _extract_cli(empty, "--output", tmp_path / "o2")
    assert res.returncode == 2 and "no images found" in res.stderr


def test_hosts_probing_one_new_output_at_once_do_not_collide(tmp_path):
    """Every process of a multi-host run checks --output before its backend comes up; two real
    processes released together probe 200 fresh paths: none fails, none leaves anything behind
    (the probe once made and removed the folder, and one host's rmdir broke the other's probe)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    barrier, errors = ctx.Barrier(2, timeout=120), ctx.Queue()
    procs = [ctx.Process(target=probe_new_outputs, args=(str(tmp_path), 200, barrier, errors)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    assert [p.exitcode for p in procs] == [0, 0] and not failures, failures[:3]
    assert os.listdir(tmp_path) == []


def test_convert_into_a_missing_folder(tmp_path, ft10):
    _, path = ft10
    res = cli("convert", path, "--model", TINY, "-o", tmp_path / "new" / "sub" / "ft10")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "new" / "sub" / "ft10.msgpack").is_file()


def test_every_input_failing_is_an_error(odd_dir, tmp_path):
    src = tmp_path / "broken.txt"
    src.write_text("\n".join(str(odd_dir / n) for n in ("broken.png", "hopper_bad.p7")) + "\n")
    res = _extract_cli(src, "--output", tmp_path / "o")
    assert res.returncode == 2 and "every one of the 2 inputs failed" in res.stderr
    assert len(read_failures(tmp_path / "o")) == 2  # and the ledger says why


def test_disk_full_says_what_was_kept(imagenet_dir, tmp_path):
    """A real full filesystem: a 200 KB tmpfs in a private mount namespace (unshare)."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not installed")
    out = tmp_path / "small"
    out.mkdir()
    src = tmp_path / "imgs.txt"
    src.write_text("\n".join(str(p) for p in _photos(imagenet_dir, 40)) + "\n")
    script = (f"mount -t tmpfs -o size=200k tmpfs {out} && exec " +
              " ".join(cli_command("extract", src, "--output", out, "--model", TINY, "--random-weights",
                                   "--no-progress", "--batch-size", "4", "--shard-size", "4",
                                   "--outputs", "pooled,tokens")))
    res = subprocess.run(["unshare", "-rm", "sh", "-c", script], env=subprocess_env(), capture_output=True,
                         text=True, timeout=600)
    if "mount" in res.stderr and "ermission" in res.stderr:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    assert res.returncode == 2, res.stderr[-2000:]
    assert "no space left on the device writing" in res.stderr and "Traceback" not in res.stderr
    assert "were finished and are kept" in res.stderr and "--resume" in res.stderr


# ---- 5, 11, 12: odd inputs never hang or multiply ------------------------------------------------
def test_symlink_loops_fifos_and_truncated_shards(imagenet_dir, tmp_path):
    root = tmp_path / "tree"
    (root / "a" / "b").mkdir(parents=True)
    photos = _photos(imagenet_dir, 3)
    for p in photos:
        shutil.copy(p, root / "a" / p.name)
    (root / "a" / "b" / "up").symlink_to(root / "a")  # a loop: a/b/up -> a
    os.mkfifo(root / "a" / "pipe.jpg")  # a FIFO named like an image: reading it would block forever
    model, variables = beit_jax.create_model(TINY, num_classes=0)
    summary = extract(str(root), str(tmp_path / "o"), model, variables, batch_size=4, progress=False)
    paths, _ = read_features(tmp_path / "o")
    assert sorted(Path(p).name for p in paths) == sorted(p.name for p in photos)  # each photo once
    errors = {Path(f["path"]).name: f["error"] for f in read_failures(tmp_path / "o")}
    assert "not a regular file" in errors["pipe.jpg"] and "symlink loop" in errors["up"]
    assert summary["images"] == 3

    import tarfile
    shard = tmp_path / "good.tar"
    with tarfile.open(shard, "w") as tf:
        for p in photos:
            tf.add(p, arcname=p.stem + ".jpg")
    with tarfile.open(shard) as tf:
        second = tf.getmembers()[1]
    cut = tmp_path / "cut.tar"
    cut.write_bytes(shard.read_bytes()[: second.offset_data + second.size // 2])  # inside the 2nd image
    extract(str(tmp_path / "*.tar"), str(tmp_path / "t"), model, variables, batch_size=4, progress=False)
    paths, _ = read_features(tmp_path / "t")
    kept_from_cut = [p for p in paths if "/cut.tar/" in p]
    assert len([p for p in paths if "/good.tar/" in p]) == 3 and len(kept_from_cut) == 1
    assert any("cut.tar" in f["path"] and "unreadable after member" in f["error"]
               for f in read_failures(tmp_path / "t"))


def test_unreadable_folder_is_recorded(imagenet_dir, tmp_path):
    """A sub-folder the user cannot list. Root reads anything, so as root the listing runs without
    the capabilities that let it (setpriv drops CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH, still uid 0:
    the checkout and the venv stay readable wherever they sit, even under a 0700 folder)."""
    base = tmp_path / "tree"
    (base / "ok").mkdir(parents=True)
    (base / "secret").mkdir()
    for p in _photos(imagenet_dir, 2):
        shutil.copy(p, base / "ok" / p.name)
    shutil.copy(_photos(imagenet_dir, 3)[2], base / "secret" / "hidden.jpg")
    os.chmod(base / "secret", 0)
    code = ("import json, sys; from beit_jax.sources import list_inputs; i = list_inputs(sys.argv[1]); "
            "print(json.dumps([[r.id for r in i.items], [p.error for p in i.problems]]))")
    cmd = [sys.executable, "-c", code, str(base)]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: cannot test an unreadable folder")
        cmd = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] + cmd
    try:
        res = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    finally:
        os.chmod(base / "secret", stat.S_IRWXU)
    assert res.returncode == 0, res.stderr[-2000:]
    items, problems = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(items) == 2 and len(problems) == 1 and "cannot list folder" in problems[0] and "secret" in problems[0]


@pytest.mark.parametrize("sig,when", [(signal.SIGINT, "while compiling"), (signal.SIGTERM, "mid-run")])
def test_ctrl_c_and_sigterm_stop_cleanly_and_resume(sig, when, imagenet_dir, tmp_path):
    src = tmp_path / "imgs.txt"
    src.write_text("\n".join(str(p) for p in _photos(imagenet_dir, 200)) + "\n")
    out = tmp_path / "o"
    args = ["extract", src, "--output", out, "--model", TINY, "--random-weights", "--no-progress",
            "--batch-size", "4", "--shard-size", "4", "--workers", "1"]
    proc = subprocess.Popen(cli_command(*args), env=subprocess_env(1), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while time.time() < deadline:
        units = len(list((out / "units").glob("*.json")))  # finished markers (not one being written)
        if (when == "while compiling" and (out / "manifest.json").exists()) or units >= 3:
            break
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.01)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + sig, err[-2000:]
    assert "Traceback" not in err and "Segmentation" not in err
    assert f"{signal.Signals(sig).name}: stopping after the current batch" in err
    assert "run the same command with --resume to continue" in err or "nothing was written" in err
    resumed = run_cli(*args, "--resume", devices=1)
    assert resumed.returncode == 0, resumed.stderr
    paths, _ = read_features(out)
    assert len(paths) == 200 and paths == [str(p) for p in _photos(imagenet_dir, 200)]


# ---- 6: damaged outputs are found and named -----------------------------------------------------
def test_truncated_and_altered_files_are_found(imagenet_dir, tmp_path):
    src = tmp_path / "imgs.txt"
    src.write_text("\n".join(str(p) for p in _photos(imagenet_dir, 12)) + "\n")
    out = tmp_path / "o"
    ok = _extract_cli(src, "--output", out, "--batch-size", "4", "--shard-size", "4")
    assert ok.returncode == 0, ok.stderr
    p_ref, f_ref = read_features(out)

    npy = sorted((out / "pooled").iterdir())
    npy[1].write_bytes(npy[1].read_bytes()[:100])  # truncated
    with pytest.raises(CorruptOutputError, match=r"unfinished.*0000001-0000\.npy \(100 bytes, expected"):
        read_features(out)
    with pytest.warns(UserWarning, match="returning the finished units only"):
        partial, _ = read_features(out, allow_partial=True)
    assert len(partial) == 8  # an explicit partial read, never a silent one
    res = _extract_cli(src, "--output", out, "--batch-size", "4", "--shard-size", "4", "--resume")
    assert res.returncode == 0 and "warning: redoing unit 1" in res.stderr and "2/3 units already done" in res.stdout
    np.testing.assert_array_equal(read_features(out)[1], f_ref)

    data = bytearray(npy[2].read_bytes())
    data[-1] ^= 0x55  # same size, one bit pattern changed
    npy[2].write_bytes(bytes(data))
    with pytest.raises(CorruptOutputError, match=r"0000002-0000\.npy does not match what was written.*`resume=True, verify=True`"):
        read_features(out)
    res = _extract_cli(src, "--output", out, "--batch-size", "4", "--shard-size", "4", "--resume", "--verify")
    assert res.returncode == 0 and "sha256 differs" in res.stderr
    np.testing.assert_array_equal(read_features(out)[1], f_ref)


# ---- 8, 10: the user's files, one writer, durable renames ---------------------------------------
def test_second_writer_is_refused_and_foreign_files_survive(imagenet_dir, tmp_path):
    """Two real writers: the first reads its images from an HTTP server that holds every request
    until the second run has been answered, so the first is still running when the second starts
    (however slowly the second starts on a loaded machine)."""
    import functools
    import http.server
    import threading

    gate = threading.Event()

    class Held(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            gate.wait(300)
            super().do_GET()

        def log_message(self, *a):
            pass

    photos = _photos(imagenet_dir, 60)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(Held, directory=str(photos[0].parent)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    src = tmp_path / "urls.csv"
    src.write_text("url\n" + "".join(f"http://127.0.0.1:{server.server_address[1]}/{p.name}\n" for p in photos))
    out = tmp_path / "o"
    out.mkdir()
    mine = out / "notes.tmp-1234"  # the user's file, with '.tmp-' in its name
    mine.write_text("keep me")
    args = ["extract", src, "--output", out, "--model", TINY, "--random-weights", "--no-progress",
            "--batch-size", "4", "--shard-size", "4", "--workers", "1"]
    try:
        first = subprocess.Popen(cli_command(*args), env=subprocess_env(1), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 600
        while not (out / "manifest.json").exists() and time.time() < deadline:
            assert first.poll() is None, first.stderr.read()[-2000:]
            time.sleep(0.05)
        second = run_cli(*args, "--resume", devices=1)
        assert first.poll() is None, "the first run ended before the second started: the test proves nothing"
        assert second.returncode == 2 and "is being written by another beit-jax extract (pid" in second.stderr
        gate.set()
        so, se = first.communicate(timeout=900)
    finally:
        gate.set()
        server.shutdown()
    assert first.returncode == 0, se[-2000:]  # the first run was not disturbed
    assert len(read_features(out)[0]) == 60
    assert mine.read_text() == "keep me"


def test_renames_are_made_durable(tmp_path, monkeypatch):
    """After an atomic rename the folder itself is fsynced (a finished file survives power loss)."""
    from beit_jax import _io

    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        return real_fsync(fd)

    monkeypatch.setattr(_io.os, "fsync", recording_fsync)
    _io.atomic_write(tmp_path / "f.bin", b"data")
    assert synced == [False, True]  # the file, then its folder


# ---- 15: memory bounded by bytes ----------------------------------------------------------------
def test_parts_are_bounded_by_bytes(imagenet_dir, tmp_path):
    model, variables = beit_jax.create_model(TINY, num_classes=0)
    photos = _photos(imagenet_dir, 10)
    row = (17 * 64 + 64) * 4  # tokens + pooled floats per image
    extract([str(p) for p in photos], str(tmp_path / "o"), model, variables, batch_size=4, shard_size=10,
            outputs=["pooled", "tokens"], part_bytes=3 * row, progress=False)
    parts = sorted((tmp_path / "o" / "tokens").iterdir())
    assert len(parts) == 4  # 10 rows, at most 3 per part: 3 + 3 + 3 + 1
    assert all(np.load(p).shape[0] <= 3 for p in parts)
    paths, tokens = read_features(tmp_path / "o", "tokens")
    assert tokens.shape == (10, 17, 64) and paths == [str(p) for p in photos]
    big, _ = beit_jax.create_model("beit_large_patch16_512", num_classes=0)
    from beit_jax.extract import output_row_floats
    from beit_jax.sinks import FeatureWriter
    from beit_jax.storage import Folder
    writer = FeatureWriter(Folder(str(tmp_path / "x")), ["tokens"], output_row_floats(big, ["tokens"]), [])
    assert writer.rows_per_part * output_row_floats(big, ["tokens"])["tokens"] <= 256 << 20  # not 17 GB


# ---- 3, 7, 9: fine-tuning keeps classes straight, stops on divergence, keeps other runs ---------
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
