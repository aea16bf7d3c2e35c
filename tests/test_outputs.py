"""The output folder: one writer at a time, the user's files kept, damage found and named, renames
made durable, parts bounded by bytes, hosts probing a new folder at once."""
from __future__ import annotations

import os
import stat
import subprocess
import time

import numpy as np
import pytest

import beit_jax
from beit_jax.extract import extract, read_features
from beit_jax.sinks import CorruptOutputError
from tests.support import TINY, cli_command, extract_cli, probe_new_outputs, run_cli, sample_photos, subprocess_env


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


def test_truncated_and_altered_files_are_found(imagenet_dir, tmp_path):
    src = tmp_path / "imgs.txt"
    src.write_text("\n".join(str(p) for p in sample_photos(imagenet_dir, 12)) + "\n")
    out = tmp_path / "o"
    ok = extract_cli(src, "--output", out, "--batch-size", "4", "--shard-size", "4")
    assert ok.returncode == 0, ok.stderr
    p_ref, f_ref = read_features(out)

    npy = sorted((out / "pooled").iterdir())
    npy[1].write_bytes(npy[1].read_bytes()[:100])  # truncated
    with pytest.raises(CorruptOutputError, match=r"unfinished.*0000001-0000\.npy \(100 bytes, expected"):
        read_features(out)
    with pytest.warns(UserWarning, match="returning the finished units only"):
        partial, _ = read_features(out, allow_partial=True)
    assert len(partial) == 8  # an explicit partial read, never a silent one
    res = extract_cli(src, "--output", out, "--batch-size", "4", "--shard-size", "4", "--resume")
    assert res.returncode == 0 and "warning: redoing unit 1" in res.stderr and "2/3 units already done" in res.stdout
    np.testing.assert_array_equal(read_features(out)[1], f_ref)

    data = bytearray(npy[2].read_bytes())
    data[-1] ^= 0x55  # same size, one bit pattern changed
    npy[2].write_bytes(bytes(data))
    with pytest.raises(CorruptOutputError, match=r"0000002-0000\.npy does not match what was written.*`resume=True, verify=True`"):
        read_features(out)
    res = extract_cli(src, "--output", out, "--batch-size", "4", "--shard-size", "4", "--resume", "--verify")
    assert res.returncode == 0 and "sha256 differs" in res.stderr
    np.testing.assert_array_equal(read_features(out)[1], f_ref)


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

    photos = sample_photos(imagenet_dir, 60)
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


def test_parts_are_bounded_by_bytes(imagenet_dir, tmp_path):
    model, variables = beit_jax.create_model(TINY, num_classes=0)
    photos = sample_photos(imagenet_dir, 10)
    row = (17 * 64 + 64) * 4  # tokens + pooled floats per image
    extract([str(p) for p in photos], str(tmp_path / "o"), model, variables, batch_size=4, shard_size=10,
            outputs=["pooled", "tokens"], part_bytes=3 * row, progress=False)
    parts = sorted((tmp_path / "o" / "tokens").iterdir())
    assert len(parts) == 4  # 10 rows, at most 3 per part: 3 + 3 + 3 + 1
    assert all(np.load(p).shape[0] <= 3 for p in parts)
    paths, tokens = read_features(tmp_path / "o", "tokens")
    assert tokens.shape == (10, 17, 64) and paths == [str(p) for p in photos]
    big = beit_jax.build_model("beit_large_patch16_512", num_classes=0)  # the module: its sizes, no weights
    from beit_jax.extract import output_row_floats
    from beit_jax.sinks import FeatureWriter
    from beit_jax.storage import Folder
    writer = FeatureWriter(Folder(str(tmp_path / "x")), ["tokens"], output_row_floats(big, ["tokens"]), [])
    assert writer.rows_per_part * output_row_floats(big, ["tokens"])["tokens"] <= 256 << 20  # not 17 GB


# ---- streaming reads ------------------------------------------------------------------------------
def test_iter_features_streams_in_input_order_and_checks_every_file(imagenet_dir, tmp_path):
    import hashlib
    import json

    import pyarrow.parquet as pq

    from beit_jax.sinks import parquet_bytes

    model, variables = beit_jax.create_model(TINY, num_classes=0)
    photos = sample_photos(imagenet_dir, 12)
    out = tmp_path / "o"
    extract([str(p) for p in photos], str(out), model, variables, batch_size=4, shard_size=5,
            part_bytes=3 * 64 * 4, progress=False)  # units of 5, 5, 2 rows; parts of at most 3 rows
    paths, feats, ids = read_features(out, with_ids=True)
    assert paths == [str(p) for p in photos] and list(ids) == list(range(12))
    chunks = list(beit_jax.iter_features(out, batch_rows=5))
    assert [len(c[0]) for c in chunks] == [5, 5, 2]  # across part and unit boundaries
    np.testing.assert_array_equal(np.concatenate([c[0] for c in chunks]), ids)
    assert sum((c[1] for c in chunks), []) == paths
    np.testing.assert_array_equal(np.concatenate([c[2] for c in chunks]), feats)
    with pytest.raises(ValueError, match="batch_rows must be a positive integer"):
        beit_jax.iter_features(out, batch_rows=0)

    last = sorted((out / "pooled").iterdir())[-1]
    data = bytearray(last.read_bytes())
    data[-1] ^= 0x55
    last.write_bytes(bytes(data))
    stream = beit_jax.iter_features(out, batch_rows=5)
    np.testing.assert_array_equal(next(stream)[2], feats[:5])  # what comes before the damage is read
    with pytest.raises(CorruptOutputError, match=rf"{last.name} does not match what was written"):
        list(stream)
    data[-1] ^= 0x55
    last.write_bytes(bytes(data))

    # a part whose rows are out of input order (a folder mixing runs) is refused, not re-sorted
    marker_path = out / "units" / "0000001.json"
    marker = json.loads(marker_path.read_text())
    part = marker["parts"][0]
    rel = f"metadata/{part['stem']}.parquet"
    table = pq.read_table(out / rel)
    blob = parquet_bytes({"id": table.column("id").to_pylist()[::-1], "path": table.column("path").to_pylist()})
    (out / rel).write_bytes(blob)
    part["files"][rel] = {"bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
    marker_path.write_text(json.dumps(marker))
    with pytest.raises(CorruptOutputError, match=r"rows out of input order or repeated in .*0000001-0000\.parquet"):
        read_features(out)

    (out / "units" / "0000002.json").unlink()
    with pytest.raises(CorruptOutputError, match="unit marker is missing"):
        beit_jax.iter_features(out)  # refused before the first chunk
