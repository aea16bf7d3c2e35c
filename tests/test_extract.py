"""`beit-jax extract`: parity with model.apply, bad images, kill/resume, signals and a full disk,
multi-device and multi-host."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tarfile
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

import beit_jax
from beit_jax._io import TEMP_MARKER
from beit_jax.extract import CorruptOutputError, OutputMismatchError, extract, read_failures, read_features
from tests.support import (TINY, assert_exactly_the_rows_of, cli, cli_command, elastic_fleet, extract_cli, run_cli,
                           run_helper, run_process_pair, sample_photos, start_process_pair, subprocess_env)

BROKEN = {"broken.png", "broken_data_stream.png", "decompression_bomb.gif", "hopper_bad.p7",
          "truncated_end_chunk.png"}


@pytest.fixture(scope="module")
def mixed_list(tmp_path_factory, imagenet_dir, odd_dir):
    """13 real photos interleaved with every odd/broken file: 40 inputs, 5 unreadable."""
    real = sorted(imagenet_dir.iterdir())[:13]
    odd = sorted(odd_dir.iterdir())
    assert len(odd) == 27
    items = [str(p) for pair in zip(odd, real + [None] * len(odd)) for p in pair if p is not None]
    path = tmp_path_factory.mktemp("lists") / "inputs.txt"
    path.write_text("\n".join(items) + "\n")
    return path, items


@pytest.mark.parametrize("devices,configs", [
    # batch 16 on one CPU device runs the model's micro-batches (2 x 8), batch 6 runs whole
    (1, [dict(batch_size=16, parallel="sharded"), dict(batch_size=6, parallel="pmap", workers=0)]),
    (8, [dict(batch_size=16, parallel="sharded", backend="process"), dict(batch_size=8, parallel="pmap")]),
])
def test_features_equal_model_apply_one_by_one(devices, configs, mixed_list, tmp_path):
    list_file, items = mixed_list
    res = run_helper("extract_parity.py", list_file, tmp_path, json.dumps(configs), devices=devices)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["devices"] == devices
    assert {os.path.basename(p) for p in report["broken"]} == BROKEN
    readable = [p for p in items if p not in report["broken"]]
    for run in report["runs"]:
        assert run["paths"] == readable, run["parallel"]  # every readable image, in input order
        assert run["max_abs"] <= 1e-5, run
        assert run["failed"] == sorted(report["broken"], key=items.index)
        assert all("cannot read image" in e for e in run["errors"])
        assert run["summary_failed"] == len(BROKEN)
        assert run["compiled"] == 1  # the padded last batch did not recompile


def _units(out):
    """Finished units' markers (a marker being written at the kill is a temp file, not a unit)."""
    if not (out / "units").is_dir():
        return []
    return sorted(n for n in os.listdir(out / "units") if n.endswith(".json") and TEMP_MARKER not in n)


def _extract_args(src, out, *extra):
    return ["extract", src, "--output", out, "--model", TINY, "--random-weights", "--no-progress", *extra]


def test_sigkill_then_resume_equals_uninterrupted_run(imagenet_dir, tmp_path):
    src = tmp_path / "imgs.txt"
    # the tiny model is fast: 160 images in 40 shards leave time to kill it mid-run
    src.write_text("\n".join(str(p) for p in sorted(imagenet_dir.iterdir())[:160]) + "\n")
    args = ["--batch-size", "4", "--shard-size", "4", "--workers", "1"]
    ref = run_cli(*_extract_args(src, tmp_path / "ref", *args), devices=1)
    assert ref.returncode == 0, ref.stderr
    assert "compute: float32, batch 4; attention: xla" in ref.stdout  # what ran, in the summary

    out = tmp_path / "killed"
    proc = subprocess.Popen(cli_command(*_extract_args(src, out, *args)), env=subprocess_env(1),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 600
    while time.time() < deadline:
        if len(_units(out)) >= 3:
            break
        if proc.poll() is not None:
            pytest.fail("extract finished before it could be killed")
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    units_at_kill = _units(out)
    assert 3 <= len(units_at_kill) < 40
    assert json.loads((out / "manifest.json").read_text())["status"] == "running"

    again = run_cli(*_extract_args(src, out, *args), devices=1)
    assert again.returncode == 2 and "pass --resume" in again.stderr  # no silent overwrite
    resumed = run_cli(*_extract_args(src, out, *args, "--resume"), devices=1)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{len(units_at_kill)}/40 units already done" in resumed.stdout
    assert not [p for p in out.rglob("*") if TEMP_MARKER in p.name]

    p_ref, f_ref = read_features(tmp_path / "ref")
    p_res, f_res = read_features(out)
    assert p_res == p_ref and len(p_ref) == 160
    np.testing.assert_array_equal(f_res, f_ref)


def test_refuses_to_mix_runs_in_one_folder(imagenet_dir, tmp_path):
    model, variables = beit_jax.create_model(TINY, num_classes=0)
    imgs = sorted(imagenet_dir.iterdir())[:3]
    src = [str(p) for p in imgs]
    extract(src, str(tmp_path / "o"), model, variables, batch_size=4, progress=False)
    with pytest.raises(OutputMismatchError, match="already holds a complete run"):
        extract(src, str(tmp_path / "o"), model, variables, batch_size=4, progress=False)
    summary = extract(src, str(tmp_path / "o"), model, variables, batch_size=4, progress=False, resume=True)
    assert summary["images"] == 0 and summary["skipped_units"] == summary["units"] == 1
    other = jax_tree_add(variables, 1e-3)
    with pytest.raises(OutputMismatchError, match="weights_sha256"):
        extract(src, str(tmp_path / "o"), model, other, batch_size=4, progress=False, resume=True)
    with pytest.raises(OutputMismatchError, match="outputs \\(`outputs`\\): folder has \\['pooled'\\], this run \\['tokens'\\]"):
        extract(src, str(tmp_path / "o"), model, variables, batch_size=4, progress=False, resume=True,
                outputs=["tokens"])
    with pytest.raises(OutputMismatchError, match="decode \\(`decode`\\): folder has 'exact', this run 'fast'"):
        extract(src, str(tmp_path / "o"), model, variables, batch_size=4, progress=False, resume=True,
                decode="fast")  # fast decoding gives other pixels: not rows of the same run


def jax_tree_add(tree, eps):
    import jax
    return jax.tree_util.tree_map(lambda a: a + eps, tree)


def test_tar_shards_folder_and_list_agree(imagenet_dir, odd_dir, tmp_path):
    imgs = sorted(imagenet_dir.iterdir())[:5] + [odd_dir / "broken.png", odd_dir / "pil_sample_cmyk.jpg"]
    folder = tmp_path / "folder" / "sub"
    folder.mkdir(parents=True)
    for p in imgs:
        (folder / p.name).write_bytes(p.read_bytes())
    with tarfile.open(tmp_path / "shard-0.tar", "w") as tf:
        for p in sorted(folder.iterdir()):
            tf.add(p, arcname=p.name)
    (folder / "notes.txt").write_text("not an image")  # not an input of the folder source
    model, variables = beit_jax.create_model(TINY, num_classes=0, rng=3)
    kw = dict(batch_size=4, progress=False, outputs=["pooled", "tokens"])
    extract(str(tmp_path / "folder"), str(tmp_path / "a"), model, variables, **kw)
    extract(str(tmp_path / "shard-*.tar"), str(tmp_path / "b"), model, variables, **kw)
    pa, fa = read_features(tmp_path / "a")
    pb, fb = read_features(tmp_path / "b")
    assert [os.path.basename(p).split(".")[0] for p in pa] == [os.path.basename(p) for p in pb]  # webdataset keys
    assert len(pa) == 6 and pb[0].startswith(str(tmp_path / "shard-0.tar") + "/")
    np.testing.assert_array_equal(fa, fb)
    assert read_features(tmp_path / "a", "tokens")[1].shape == (6, 17, 64)
    assert [os.path.basename(f["path"]) for f in read_failures(tmp_path / "b")] == ["broken"]


@pytest.mark.parametrize("parallel", ["sharded", "pmap"])
def test_two_process_multihost_matches_single_process(parallel, mixed_list, tmp_path):
    """Two real processes on loopback (gloo CPU collectives, 4 devices each) vs one process."""
    list_file, items = mixed_list
    args = ["--batch-size", "8", "--shard-size", "8", "--parallel", parallel, "--outputs", "pooled,logits"]
    single = run_cli(*_extract_args(list_file, tmp_path / "single", *args), devices=8)
    assert single.returncode == 0, single.stderr

    outs = run_process_pair(lambda i: _extract_args(list_file, tmp_path / "multi", *args), tmp_path, "p")
    assert "8 devices x 2 processes" in outs[0][0]
    writers = {json.loads((tmp_path / "multi" / "units" / n).read_text())["process"] for n in _units(tmp_path / "multi")}
    assert writers == {0, 1}  # each process wrote its own units into the one output

    for output in ("pooled", "logits"):
        p1, f1 = read_features(tmp_path / "single", output)
        p2, f2 = read_features(tmp_path / "multi", output)
        assert p1 == p2 and len(p1) == len(items) - len(BROKEN)
        np.testing.assert_allclose(f2, f1, atol=1e-5)
    assert read_failures(tmp_path / "multi") == read_failures(tmp_path / "single")


def test_a_lost_host_stops_the_other_at_once_saying_so_and_resume_continues(imagenet_dir, tmp_path):
    """SIGKILL one process of a two-host run: the other exits within --host-timeout with one line
    naming it and what to do (status 75, no C++ abort), and a resume with both hosts completes."""
    src = tmp_path / "imgs.txt"
    src.write_text("\n".join(str(p) for p in sample_photos(imagenet_dir, 160)) + "\n")
    args = ["--batch-size", "8", "--shard-size", "4", "--workers", "1"]
    ref = extract_cli(src, "--output", tmp_path / "ref", *args)
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "multi"
    procs, logs = start_process_pair(lambda i: _extract_args(src, out, *args, "--host-timeout", "5"), tmp_path, "lost")
    try:
        deadline = time.time() + 600
        while not any(json.loads((out / "units" / n).read_text())["process"] == 1 for n in _units(out)):
            assert time.time() < deadline and all(p.poll() is None for p in procs), logs[1][1].read_text()[-3000:]
            time.sleep(0.05)
        procs[1].kill()
        killed_at = time.time()
        procs[0].wait(timeout=120)
        waited = time.time() - killed_at
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    err = logs[0][1].read_text()
    assert procs[0].returncode == 75, err[-3000:]
    assert "beit-jax: lost a host: process 1 of 2 sent no heartbeat for 5s" in err and "--resume" in err, err[-3000:]
    assert "--elastic" in err and "stack trace" not in err
    assert waited < 5 + 20  # the heartbeat timeout and a margin, not JAX's 100 s
    assert len(_units(out)) < 40
    run_process_pair(lambda i: _extract_args(src, out, *args, "--resume"), tmp_path, "again")
    p_ref, f_ref = read_features(tmp_path / "ref")
    p_res, f_res = read_features(out)
    assert p_res == p_ref
    np.testing.assert_allclose(f_res, f_ref, atol=1e-5)


# ---- what a resume and a reader see after a kill -------------------------------------------------
def _as_killed_before_markers(out, units):
    """The folder as a kill leaves it before these units' markers were written (what
    test_sigkill_then_resume_equals_uninterrupted_run produces for real): their parts are there,
    their markers are not, the manifest says running and failed.jsonl is not gathered yet."""
    for u in units:
        (out / "units" / f"{u:07d}.json").unlink()
    manifest = json.loads((out / "manifest.json").read_text())
    for k in ("rows", "failed"):
        manifest.pop(k)
    (out / "manifest.json").write_text(json.dumps(dict(manifest, status="running")))
    (out / "failed.jsonl").unlink()


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


def test_resume_removes_the_parts_a_killed_unit_left(imagenet_dir, tmp_path):
    """A unit of 4 parts killed before its marker, whose inputs break before --resume, is redone
    with 1 part: the 3 other old parts must go (embedding-reader and autofaiss read every file of
    pooled/ and metadata/, so they got rows that are not in the result)."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for p in sorted(imagenet_dir.iterdir())[:12]:
        (photos / p.name).write_bytes(p.read_bytes())
    src = [str(p) for p in sorted(photos.iterdir())]
    model, variables = beit_jax.create_model(TINY, num_classes=0)
    out = tmp_path / "o"
    kw = dict(batch_size=4, shard_size=12, part_bytes=3 * 64 * 4, progress=False)  # 3 pooled rows a part
    extract(src, str(out), model, variables, **kw)
    assert _files(out / "pooled") == [f"0000000-000{i}.npy" for i in range(4)]
    _as_killed_before_markers(out, [0])
    for path in src[2:]:
        with open(path, "wb") as f:
            f.write(b"not an image any more")
    extract(src, str(out), model, variables, resume=True, **kw)
    assert read_features(out)[0] == src[:2] and len(read_failures(out)) == 10
    assert _files(out / "pooled") == ["0000000-0000.npy"]
    assert _files(out / "metadata") == ["0000000-0000.parquet"]


def test_read_features_refuses_a_complete_run_missing_markers(imagenet_dir, tmp_path):
    """A copy that left out a unit marker read as fewer rows, silently, though the manifest
    records num_units and rows."""
    src = [str(p) for p in sorted(imagenet_dir.iterdir())[:12]]
    model, variables = beit_jax.create_model(TINY, num_classes=0)
    extract(src, str(tmp_path / "o"), model, variables, batch_size=4, shard_size=4, progress=False)
    (tmp_path / "o" / "units" / "0000001.json").unlink()
    with pytest.raises(CorruptOutputError, match=r"manifest says complete but 1 unit marker is missing "
                                                 r"\(.*units/0000001\.json\)"):
        read_features(tmp_path / "o")
    with pytest.warns(UserWarning, match="returning the finished units only"):
        paths, _ = read_features(tmp_path / "o", allow_partial=True)
    assert paths == src[:4] + src[8:]
    # rerunning said "already holds a complete run; pass resume=True (nothing to do)": it is not complete
    with pytest.raises(OutputMismatchError, match=r"marked complete, but 1 of its 3 unit markers are missing.*"
                                                  r"`resume=True` to redo those units"):
        extract(src, str(tmp_path / "o"), model, variables, batch_size=4, shard_size=4, progress=False)
    again = extract(src, str(tmp_path / "o"), model, variables, batch_size=4, shard_size=4, progress=False,
                    resume=True)
    assert again["images"] == 4 and read_features(tmp_path / "o")[0] == src


def test_a_folder_is_walked_once_and_a_resume_reads_the_listing_the_run_saved(imagenet_dir, tmp_path, capsys):
    """A folder SRC's listing is kept in OUT/inputs/ (parquet + json): a resume (and a later elastic
    worker) reads its rows from there a row group at a time instead of walking the folder again.
    An image added since is not part of the run, and the resume says so; a new OUT reads it; a
    damaged listing is a clear error naming the file."""
    photos = tmp_path / "photos"
    photos.mkdir()
    imgs = sample_photos(imagenet_dir, 11)
    for p in imgs[:10]:
        shutil.copy(p, photos / p.name)
    model, variables = beit_jax.create_model(TINY, num_classes=0)
    kw = dict(batch_size=4, shard_size=4, progress=False)
    out = tmp_path / "o"
    extract(str(photos), str(out), model, variables, **kw)
    saved = sorted(os.listdir(out / "inputs"))
    assert len(saved) == 2 and saved[0].endswith(".parquet") and saved[1].endswith(".json"), saved
    assert pq.read_table(out / "inputs" / saved[0]).column("path").to_pylist() == sorted(
        str(photos / p.name) for p in imgs[:10])
    paths, feats = read_features(out)

    (out / "units" / "0000001.json").unlink()  # a unit to redo: its rows come from the saved listing
    shutil.copy(imgs[10], photos / "added-later.jpg")
    capsys.readouterr()
    again = extract(str(photos), str(out), model, variables, resume=True, **kw)
    assert again["images"] == 4 and again["skipped_units"] == 2
    assert "read from the listing this run saved in" in capsys.readouterr().err
    paths2, feats2 = read_features(out)
    assert paths2 == paths and np.array_equal(feats2, feats)
    extract(str(photos), str(tmp_path / "new"), model, variables, **kw)  # a new run lists the folder anew
    assert len(read_features(tmp_path / "new")[0]) == 11

    (out / "inputs" / saved[0]).write_bytes(b"not parquet")
    with pytest.raises(ValueError, match=r"inputs/.*\.parquet, the saved listing of .*photos, cannot be read"):
        extract(str(photos), str(out), model, variables, resume=True, **kw)


def test_resume_on_another_device_count(imagenet_dir, tmp_path):
    """Killed on 3 devices (a default global batch that is a multiple of 3), resumed on 1 (64): the batch is
    not part of a run's identity, rows do not depend on it (the resume was refused as "a
    different run")."""
    src = tmp_path / "imgs.txt"
    src.write_text("\n".join(str(p) for p in sorted(imagenet_dir.iterdir())[:12]) + "\n")
    out = tmp_path / "o"
    first = run_cli(*_extract_args(src, out, "--shard-size", "4"), devices=3)
    assert first.returncode == 0, first.stderr
    batch3 = json.loads((out / "manifest.json").read_text())["global_batch_size"]
    assert batch3 % 3 == 0 and batch3 != 64  # the default follows the device count
    reference = read_features(out)
    _as_killed_before_markers(out, [1, 2])
    resumed = cli(*_extract_args(src, out, "--shard-size", "4", "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert "1/3 units already done" in resumed.stdout and "batch 64" in resumed.stdout
    paths, feats = read_features(out)
    assert paths == reference[0]
    np.testing.assert_allclose(feats, reference[1], rtol=0, atol=1e-6)


# ---- stopping: signals, a full disk, nothing readable -------------------------------------------
@pytest.mark.parametrize("sig,when", [(signal.SIGINT, "while compiling"), (signal.SIGTERM, "mid-run")])
def test_ctrl_c_and_sigterm_stop_cleanly_and_resume(sig, when, imagenet_dir, tmp_path):
    src = tmp_path / "imgs.txt"
    src.write_text("\n".join(str(p) for p in sample_photos(imagenet_dir, 200)) + "\n")
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
    assert len(paths) == 200 and paths == [str(p) for p in sample_photos(imagenet_dir, 200)]


def test_disk_full_says_what_was_kept(imagenet_dir, tmp_path):
    """A real full filesystem: a 200 KB tmpfs in a private mount namespace (unshare)."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not installed")
    out = tmp_path / "small"
    out.mkdir()
    src = tmp_path / "imgs.txt"
    src.write_text("\n".join(str(p) for p in sample_photos(imagenet_dir, 40)) + "\n")
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


def test_every_input_failing_is_an_error(odd_dir, tmp_path):
    src = tmp_path / "broken.txt"
    src.write_text("\n".join(str(odd_dir / n) for n in ("broken.png", "hopper_bad.p7")) + "\n")
    res = extract_cli(src, "--output", tmp_path / "o")
    assert res.returncode == 2 and "every one of the 2 inputs failed" in res.stderr
    assert len(read_failures(tmp_path / "o")) == 2  # and the ledger says why


# ---- elastic workers ---------------------------------------------------------------------------
def test_elastic_workers_one_killed_one_late_equal_a_plain_run(imagenet_dir, odd_dir, tmp_path):
    src = tmp_path / "photos"  # a folder: walked by the first workers, its listing then read from OUT
    src.mkdir()
    for p in [*sample_photos(imagenet_dir, 1000), *(odd_dir / b for b in sorted(BROKEN)[:2])]:
        (src / p.name).symlink_to(p)
    # one image per unit: enough units (and claims) that the late worker finds some left
    args = ["--batch-size", "4", "--shard-size", "1", "--workers", "1"]
    ref = extract_cli(src, "--output", tmp_path / "ref", *args)
    assert ref.returncode == 0, ref.stderr

    out = tmp_path / "elastic"
    a_pid, b, c = elastic_fleet(src, str(out), args, tmp_path)
    for name, p in (("b", b), ("c", c)):
        assert p.returncode == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
    assert_exactly_the_rows_of(out, tmp_path / "ref")
    # A died holding claims: another worker took them over (a second attempt), and C did work
    claims = os.listdir(out / "claims")
    assert any(not n.endswith("-0000.json") for n in claims if n.endswith(".json")), sorted(claims)
    workers = [json.loads((out / "units" / n).read_text())["worker"] for n in os.listdir(out / "units")]
    assert any(f":{a_pid}:" in w for w in workers) and len(set(workers)) == 3
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"

    # a worker started on a complete run adds nothing and exits 0
    before = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in out.rglob("*")}
    late = extract_cli(src, "--output", out, *args, "--elastic")
    assert late.returncode == 0 and "elastic worker: 0 images" in late.stdout, late.stderr
    assert "read from the listing this run saved in" in late.stderr  # one listing, saved by the first to save it
    assert len(os.listdir(out / "inputs")) == 2
    assert {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in out.rglob("*")} == before

    # a plain run is refused on an elastic folder, and an elastic worker on a plain one
    for folder, flags in ((out, ["--resume"]), (tmp_path / "ref", ["--elastic"])):
        res = extract_cli(src, "--output", folder, *args, *flags)
        assert res.returncode == 2 and "elastic" in res.stderr and "holds outputs of a different run" in res.stderr


def test_elastic_claims_expire_release_and_one_marker_wins(imagenet_dir, tmp_path):
    """In-process, with two lease holders on one folder: a claim is taken over only after it stopped
    changing for the lease, a released one at once; of two workers that did one unit, the first
    marker wins and the loser's files are removed."""
    from beit_jax.elastic import Leases
    from beit_jax.sinks import FeatureWriter
    from beit_jax.sources import ImageRef
    from beit_jax.storage import Folder

    folder = Folder(str(tmp_path / "out"))
    x, y = Leases(folder, 0.5), Leases(folder, 0.5)
    assert x.claim(0, 0) and not y.claim(0, 0)  # one holder per attempt
    assert y.candidates(y.scan(), [0, 1]) == [(1, 0)]  # fresh: not taken over
    x.start()  # x renews every lease / 4: its claim keeps changing, so it never expires
    time.sleep(1.2)
    assert [u for u, _ in y.candidates(y.scan(), [0, 1])] == [1]
    x.stop()  # x dies without a word: after the lease, unit 0 is free as attempt 1
    y.scan()
    time.sleep(0.7)
    assert sorted(y.candidates(y.scan(), [0, 1])) == [(0, 1), (1, 0)]
    assert y.claim(0, 1) and x.scan() and x.is_lost(0)

    rows = {"pooled": np.ones((2, 4), np.float32)}
    refs = [ImageRef(f"img{i}", f"img{i}", index=i) for i in range(2)]

    def writer(leases):
        return FeatureWriter(folder, ["pooled"], {"pooled": 16}, [], claims=leases, part_bytes=16)

    wy, wx = writer(y), writer(x)
    wy.add(0, refs, rows)
    assert wy.close(0)["attempt"] == 1
    x.lost.discard(0)  # x has not noticed it lost: its marker is refused all the same
    wx.add(0, refs, rows)
    assert wx.close(0) is None and wx.lost_units == [0]
    marker = json.loads(folder.read("units/0000000.json"))
    written = {rel for rel in folder.sizes() if rel.startswith(("pooled/", "metadata/"))}
    assert written == {f for p in marker["parts"] for f in p["files"]} and len(written) == 4
    assert all(rel.split("/")[1].startswith(("0000000-0000-1.", "0000000-0001-1.")) for rel in written)

    # a stopping worker releases its claims: taken over at once, no lease to wait
    assert x.claim(1, 0)
    x.release_all()
    assert (1, 1) in y.candidates(y.scan(), [0, 1])
