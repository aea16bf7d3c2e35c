"""Extraction in the field: a real S3 server (moto) and a GCS emulator on 127.0.0.1, webdataset shards,
URL tables served over HTTP, and the consumer tools (embedding-reader, autofaiss) in their own venv."""
from __future__ import annotations

import contextlib
import functools
import http.server
import io
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import beit_jax
from beit_jax.extract import extract, read_failures, read_features
from tests.support import (TINY, assert_exactly_the_rows_of, start_server, cli, cli_command, elastic_fleet, extract_cli, free_port,
                           run_cli, run_process_pair, sample_photos, subprocess_env)

BROKEN = ["broken.png", "truncated_end_chunk.png"]
@contextlib.contextmanager
def http_server(root: Path):
    """A plain HTTP server over `root` on loopback (what an img2dataset URL table points at)."""
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def _images(imagenet_dir, odd_dir, n=12):
    return sorted(imagenet_dir.iterdir())[:n] + [odd_dir / b for b in BROKEN]


def _webdataset_shards(folder: Path, images, per_shard=6):
    """Shards written by webdataset's own TarWriter: key + .jpg/.png + .json; the last shard gets a
    sample without an image and a copy truncated mid-member."""
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for s in range(0, len(images), per_shard):
        name = folder / f"shard-{s // per_shard:05d}.tar"
        with wds.TarWriter(str(name)) as sink:
            for p in images[s:s + per_shard]:
                ext = "png" if p.suffix.lower() == ".png" else "jpg"
                sink.write({"__key__": p.stem, ext: p.read_bytes(), "json": {"file": p.name}})
            if s + per_shard >= len(images):
                sink.write({"__key__": "caption_only", "json": {"file": None}})
        names.append(name)
    whole = names[0].read_bytes()
    truncated = folder / f"shard-{len(names):05d}.tar"
    truncated.write_bytes(whole[: len(whole) * 2 // 3])
    names.append(truncated)
    return names


def _s3_put(fs, local: Path, key: str) -> None:
    fs.put_file(str(local), key)


def _extract(*args, env, devices=1, **kw):
    return run_cli("extract", *args, "--model", TINY, "--random-weights", "--no-progress", devices=devices,
                   env_extra=env, **kw)


@pytest.fixture(scope="module")
def bucket(s3fs_client, imagenet_dir, odd_dir, tmp_path_factory):
    """s3://field/ holding images, webdataset shards and URL tables; and the local folder run."""
    fs = s3fs_client
    fs.mkdir("field")
    images = _images(imagenet_dir, odd_dir)
    for p in images:
        _s3_put(fs, p, f"field/imgs/{p.name}")
    work = tmp_path_factory.mktemp("field")
    shards = _webdataset_shards(work / "shards", images)
    for s in shards:
        _s3_put(fs, s, f"field/shards/{s.name}")
    local = work / "imgs"
    local.mkdir()
    for p in images:
        shutil.copy(p, local / p.name)
    model, variables = beit_jax.create_model(TINY, num_classes=0)
    extract(str(local), str(work / "local-run"), model, variables, batch_size=4, progress=False)
    return dict(fs=fs, images=images, work=work, shards=shards, local=local,
                reference=dict(zip(*read_features(work / "local-run"))))


def test_bucket_folder_webdataset_and_url_table_equal_a_local_run(bucket, s3_env):
    fs, ref = bucket["fs"], bucket["reference"]
    name_of = {f"s3://field/imgs/{p.name}": p.name for p in bucket["images"]}
    local_by_name = {Path(k).name: v for k, v in ref.items()}

    # a folder (bucket prefix) -> a bucket prefix
    res = _extract("s3://field/imgs", "--output", "s3://field/out/folder", "--batch-size", "4", env=s3_env)
    assert res.returncode == 0, res.stderr
    paths, feats = read_features("s3://field/out/folder")
    assert [name_of[p] for p in paths] == sorted(local_by_name)
    np.testing.assert_allclose(feats, np.stack([local_by_name[name_of[p]] for p in paths]), atol=1e-5)
    assert sorted(Path(f["path"]).name for f in read_failures("s3://field/out/folder")) == sorted(BROKEN)

    # webdataset shards with brace syntax, streamed; a caption-only sample and a truncated shard
    res = _extract("s3://field/shards/shard-{00000..00003}.tar", "--output", "s3://field/out/wds",
                   "--batch-size", "4", "--storage-dtype", "float16", env=s3_env)
    assert res.returncode == 0, res.stderr
    paths, feats, ids = read_features("s3://field/out/wds", with_ids=True)
    assert feats.dtype == np.float16
    keys = [p.rsplit("/", 1)[1] for p in paths]
    full = [k for k, p in zip(keys, paths) if "shard-00003" not in p]
    assert sorted(full) == sorted(Path(n).stem for n in local_by_name)
    assert paths[0] == f"s3://field/shards/shard-00000.tar/{keys[0]}" and list(ids) == sorted(ids)
    for k, p, f in zip(keys, paths, feats):
        np.testing.assert_allclose(f, local_by_name[next(n for n in local_by_name if Path(n).stem == k)],
                                   atol=2e-2 * np.abs(f).max())  # float16 storage
    truncated_kept = [k for p, k in zip(paths, keys) if "shard-00003" in p]
    assert 0 < len(truncated_kept) < 6  # the members before the cut are kept
    failures = {f["path"]: f["error"] for f in read_failures("s3://field/out/wds")}
    assert any("no image member" in e and "caption_only" in p for p, e in failures.items())
    assert any("shard-00003.tar" in p and "unreadable after member" in e for p, e in failures.items())

    # an img2dataset-style URL table: s3:// and http:// URLs, a missing one, a caption column
    import pyarrow as pa
    import pyarrow.parquet as pq

    with http_server(bucket["local"]) as base:
        urls = [f"s3://field/imgs/{p.name}" for p in bucket["images"][:6]]
        urls += [f"{base}/{p.name}" for p in bucket["images"][6:]] + ["s3://field/imgs/missing.jpg"]
        captions = [f"caption {i}" for i in range(len(urls))]
        buf = io.BytesIO()
        pq.write_table(pa.table({"url": urls, "caption": captions, "id": list(range(100, 100 + len(urls)))}), buf)
        fs.pipe_file("field/tables/urls.parquet", buf.getvalue())
        res = _extract("s3://field/tables/urls.parquet", "--output", "s3://field/out/table", "--batch-size", "4",
                       env=s3_env)
    assert res.returncode == 0, res.stderr
    paths, feats = read_features("s3://field/out/table")
    assert paths == [u for u in urls if Path(u).name in local_by_name and Path(u).name not in BROKEN]
    np.testing.assert_allclose(feats, np.stack([local_by_name[Path(u).name] for u in paths]), atol=1e-5)
    metas = [pq.read_table(io.BytesIO(fs.cat_file(f))).to_pylist() for f in sorted(fs.find("field/out/table/metadata"))]
    rows = [r for m in metas for r in m]
    assert [r["path"] for r in rows] == paths
    assert [r["caption"] for r in rows] == [captions[urls.index(p)] for p in paths]  # passed through, aligned
    assert [r["input_id"] for r in rows] == [100 + urls.index(p) for p in paths]  # a table's own 'id' kept aside
    failed = {f["path"] for f in read_failures("s3://field/out/table")}
    assert "s3://field/imgs/missing.jpg" in failed and {Path(p).name for p in failed} >= set(BROKEN)


def test_sigkill_mid_run_then_resume_on_s3(bucket, s3_env, imagenet_dir):
    fs = bucket["fs"]
    images = sorted(imagenet_dir.iterdir())[:120]
    fs.put([str(p) for p in images], "field/many/")
    args = ["s3://field/many", "--batch-size", "4", "--shard-size", "4", "--workers", "1"]
    # the reference run and the refusal below in-process (s3_env is this process's environment too);
    # the killed run and its resume are real processes
    ref = cli("extract", *args, "--output", "s3://field/out/ref", "--model", TINY, "--random-weights", "--no-progress")
    assert ref.returncode == 0, ref.stderr

    proc = subprocess.Popen(cli_command("extract", *args, "--output", "s3://field/out/killed", "--model", TINY,
                                        "--random-weights", "--no-progress"),
                            env=subprocess_env(1, **s3_env), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 600
    while time.time() < deadline:
        fs.invalidate_cache()
        if len(fs.glob("field/out/killed/units/*.json")) >= 3:
            break
        assert proc.poll() is None, f"extract finished before it could be killed: {proc.stderr.read()[-3000:]}"
        time.sleep(0.2)  # one listing per poll: do not flood the server the run is writing to
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    def finished_units():
        fs.invalidate_cache()
        return len(fs.glob("field/out/killed/units/*.json"))

    # an upload the killed process had sent in full may still land on the server just after the kill:
    # count once two listings half a second apart agree
    done_at_kill, previous = finished_units(), -1
    for _ in range(40):
        if done_at_kill == previous:
            break
        time.sleep(0.5)
        done_at_kill, previous = finished_units(), done_at_kill
    assert 3 <= done_at_kill < 30
    with pytest.raises(RuntimeError, match="unfinished"):
        read_features("s3://field/out/killed")  # a partial result is never returned silently

    again = cli("extract", *args, "--output", "s3://field/out/killed", "--model", TINY, "--random-weights", "--no-progress")
    assert again.returncode == 2 and "pass --resume" in again.stderr
    resumed = _extract(*args, "--output", "s3://field/out/killed", "--resume", env=s3_env)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{done_at_kill}/30 units already done" in resumed.stdout
    p_ref, f_ref = read_features("s3://field/out/ref")
    p_res, f_res = read_features("s3://field/out/killed")
    assert p_res == p_ref and len(p_ref) == 120
    np.testing.assert_array_equal(f_res, f_ref)


def test_two_processes_write_one_s3_output(bucket, s3_env):
    args = ["s3://field/imgs", "--batch-size", "8", "--shard-size", "3", "--outputs", "pooled,logits"]
    single = run_cli("extract", *args, "--output", "s3://field/out/single", "--model", TINY, "--random-weights",
                     "--no-progress", devices=8, env_extra=s3_env)
    assert single.returncode == 0, single.stderr
    run_process_pair(lambda i: ["extract", *args, "--output", "s3://field/out/multi", "--model", TINY,
                                "--random-weights", "--no-progress"], bucket["work"], "mh", env_extra=s3_env)
    fs = bucket["fs"]
    fs.invalidate_cache()
    writers = {json.loads(fs.cat_file(f))["process"] for f in fs.glob("field/out/multi/units/*.json")}
    assert writers == {0, 1}
    for output in ("pooled", "logits"):
        p1, f1 = read_features("s3://field/out/single", output)
        p2, f2 = read_features("s3://field/out/multi", output)
        assert p1 == p2 and len(p1) == 12
        np.testing.assert_allclose(f2, f1, atol=1e-5)
    assert read_failures("s3://field/out/multi") == read_failures("s3://field/out/single")


def test_elastic_workers_on_s3_one_killed_one_late_equal_a_plain_run(s3fs_client, s3_env, imagenet_dir, tmp_path):
    """Claims, markers, takeovers and the saved listing of an S3 prefix with conditional PUTs
    (If-None-Match: *) on a real S3 server."""
    s3fs_client.mkdir("elastic")
    s3fs_client.put([str(p) for p in sample_photos(imagenet_dir, 160)], "elastic/photos/")
    src = "s3://elastic/photos/"
    args = ["--batch-size", "4", "--shard-size", "1", "--workers", "1"]
    ref = extract_cli(src, "--output", tmp_path / "ref", *args)
    assert ref.returncode == 0, ref.stderr
    a_pid, b, c = elastic_fleet(src, "s3://elastic/out", args, tmp_path, env_extra=s3_env)
    for name, p in (("b", b), ("c", c)):
        assert p.returncode == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
    assert_exactly_the_rows_of("s3://elastic/out", tmp_path / "ref")
    s3fs_client.invalidate_cache()
    claims = [n.rsplit("/", 1)[1] for n in s3fs_client.ls("elastic/out/claims")]
    assert any(n.endswith("-0001.json") for n in claims), sorted(claims)[:5]
    late = extract_cli(src, "--output", "s3://elastic/out", *args, "--elastic")
    assert late.returncode == 0 and "elastic worker: 0 images" in late.stdout, late.stderr
    assert "read from the listing this run saved in s3://elastic/out/inputs/" in late.stderr
    assert len(s3fs_client.ls("elastic/out/inputs")) == 2


@pytest.fixture(scope="module")
def consumer_python(tmp_path_factory):
    """embedding-reader and autofaiss as a user installs them: their own venv (they pin numpy<2)."""
    venv = tmp_path_factory.mktemp("consumers") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "embedding-reader==1.8.1", "autofaiss==2.18.0",
                          "numpy<2", "pyarrow<20"], capture_output=True, text=True, timeout=1200)
    assert pip.returncode == 0, pip.stderr[-3000:]
    return venv / "bin" / "python"


CONSUMER = r"""
import json, sys
from embedding_reader import EmbeddingReader
from autofaiss import build_index
out = sys.argv[1]
reader = EmbeddingReader(out + "/pooled", metadata_folder=out + "/metadata", meta_columns=["path", "id"],
                         file_format="parquet_npy")
paths, rows = [], []
for emb, meta in reader(batch_size=5, show_progress=False):
    paths += meta["path"].tolist()
    rows += emb.tolist()
index, infos = build_index(embeddings=out + "/pooled", file_format="npy", save_on_disk=False, verbose=40)
dist, nn = index.search(__import__("numpy").asarray(rows[:3], "float32"), 1)
print(json.dumps({"count": int(reader.count), "dimension": int(reader.dimension), "paths": paths, "rows": rows,
                  "index_size": int(index.ntotal), "self_neighbours": nn[:, 0].tolist()}))
"""


@pytest.mark.parametrize("storage_dtype", ["float32", "float16"])
def test_embedding_reader_and_autofaiss_read_the_output(storage_dtype, consumer_python, imagenet_dir, odd_dir,
                                                        tmp_path):
    src = tmp_path / "imgs.txt"
    src.write_text("\n".join(str(p) for p in _images(imagenet_dir, odd_dir)) + "\n")
    res = run_cli("extract", src, "--output", tmp_path / "out", "--model", TINY, "--random-weights", "--no-progress",
                  "--batch-size", "4", "--shard-size", "5", "--storage-dtype", storage_dtype)
    assert res.returncode == 0, res.stderr
    got = subprocess.run([str(consumer_python), "-c", CONSUMER, str(tmp_path / "out")], capture_output=True,
                         text=True, timeout=600)
    assert got.returncode == 0, got.stderr[-3000:]
    seen = json.loads(got.stdout.strip().splitlines()[-1])
    paths, feats = read_features(tmp_path / "out")
    assert seen["count"] == len(paths) == 12 and seen["dimension"] == 64
    assert seen["paths"] == paths  # every row aligned with its metadata, in input order
    np.testing.assert_allclose(np.asarray(seen["rows"]), feats.astype(np.float32), rtol=1e-6)
    assert seen["index_size"] == 12 and seen["self_neighbours"] == [0, 1, 2]


def test_gcs_emulator_round_trip(imagenet_dir, tmp_path):
    """gcsfs against gcp-storage-emulator: extract from and to gs://."""
    port = free_port()
    exe = Path(sys.executable).parent / "gcp-storage-emulator"
    proc = start_server([str(exe), "start", "--host=127.0.0.1", f"--port={port}", "--in-memory"], port,
                         tmp_path / "emulator.log")
    try:
        # what a user of the emulator sets; the flag turns off gcsfs's gRPC bucket-type probe,
        # which the emulator does not serve
        env = {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
        opts = json.dumps({"token": "anon", "project": "test"})
        put = subprocess.run([sys.executable, "-c", (
            "import gcsfs, sys; fs = gcsfs.GCSFileSystem(token='anon', project='test'); fs.mkdir('gb'); "
            "[fs.put_file(p, 'gb/imgs/' + p.rsplit('/', 1)[1]) for p in sys.argv[1:]]"),
            *[str(p) for p in sorted(imagenet_dir.iterdir())[:5]]], env=subprocess_env(**env),
            capture_output=True, text=True, timeout=300)
        assert put.returncode == 0, put.stderr[-2000:]
        res = _extract("gs://gb/imgs", "--output", "gs://gb/out", "--storage-options", opts, "--batch-size", "4",
                       env=env)
        assert res.returncode == 0, res.stderr[-3000:]
        check = subprocess.run([sys.executable, "-c", (
            "import json, beit_jax; p, f = beit_jax.read_features('gs://gb/out', storage_options="
            "{'token': 'anon', 'project': 'test'}); print(json.dumps([p, list(f.shape)]))")],
            env=subprocess_env(**env), capture_output=True, text=True, timeout=300)
        assert check.returncode == 0, check.stderr[-2000:]
        paths, shape = json.loads(check.stdout.strip().splitlines()[-1])
        assert shape == [5, 64] and paths == [f"gs://gb/imgs/{p.name}" for p in sorted(imagenet_dir.iterdir())[:5]]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_unknown_protocol_and_missing_backend_are_clear(tmp_path):
    res = cli("extract", "nosuch://bucket/imgs", "--output", tmp_path / "o", "--model", TINY, "--random-weights")
    assert res.returncode == 2 and "nosuch:// is not a storage protocol" in res.stderr
    res = cli("extract", "sftp://host/imgs", "--output", tmp_path / "o", "--model", TINY, "--random-weights")
    assert res.returncode == 2 and "sftp:// paths need an extra package" in res.stderr
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_local_tar_streams_like_webdataset(imagenet_dir, odd_dir, tmp_path):
    """A local shard goes through the same streaming reader; webdataset's own loader sees the same keys."""
    import webdataset as wds

    shards = _webdataset_shards(tmp_path / "s", _images(imagenet_dir, odd_dir))
    keys = [s["__key__"] for s in wds.WebDataset([str(p) for p in shards[:-1]], shardshuffle=False)]
    model, variables = beit_jax.create_model(TINY, num_classes=0)
    extract(str(tmp_path / "s" / "shard-{00000..00002}.tar"), str(tmp_path / "o"), model, variables,
            batch_size=4, progress=False)
    paths, _ = read_features(tmp_path / "o")
    failed = [f["path"] for f in read_failures(tmp_path / "o")]
    assert sorted([p.rsplit("/", 1)[1] for p in paths] + [f.rsplit("/", 1)[1] for f in failed]) == sorted(keys)
