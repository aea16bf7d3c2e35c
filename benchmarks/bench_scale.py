"""How extraction's start-up, memory and finishing cost grow with the input count, and elastic workers.

    .venv/bin/python benchmarks/bench_scale.py [--rows 1000000,20000000,100000000] [--units 100000]
                                               [--s3-units 5000] [--workers 1,2,3]

1. start-up: `beit-jax extract TABLES --elastic` (tiny model, random weights) over synthetic parquet
   tables of 1M-100M rows (files of 1M rows, a url column pointing at a few real JPEGs of
   ../shared/data/imagenet-sample, and an int column): seconds from launch to the first finished
   unit, and the process's peak RSS (VmHWM) then; the process is killed there.
2. finishing and resuming: a folder of N synthetic unit markers (local disk; and on a moto S3 server
   on 127.0.0.1): seconds for `finished_units` (what a resume and finalize read) and `finalize`.
3. elastic throughput: 1, 2, 3 `--elastic` workers over the same 1000 real photos vs one plain run,
   wall time from launch to the last exit (ratios: this machine is shared and noisy).
Writes benchmarks/results/scale.json and scale.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
SAMPLE = HERE.parent.parent / "shared" / "data" / "imagenet-sample"
ROWS_PER_FILE = 1_000_000


def cli() -> list:
    exe = shutil.which("beit-jax", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "beit_jax.cli"]


def tiny_args(*extra) -> list:
    return ["--model", "test_beit", "--random-weights", "--no-progress", *extra]


def write_tables(folder: Path, rows: int, photos) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    dictionary = pa.array([str(p) for p in photos])
    rng = np.random.default_rng(0)
    for f in range((rows + ROWS_PER_FILE - 1) // ROWS_PER_FILE):
        n = min(ROWS_PER_FILE, rows - f * ROWS_PER_FILE)
        idx = pa.array(rng.integers(0, len(photos), n, dtype=np.int32))
        url = pa.DictionaryArray.from_arrays(idx, dictionary).dictionary_decode()
        pq.write_table(pa.table({"url": url, "n": pa.array(np.arange(f * ROWS_PER_FILE, f * ROWS_PER_FILE + n))}),
                       folder / f"part-{f:05d}.parquet")


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def first_unit(src: Path, out: Path) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cli() + ["extract", str(src), "--output", str(out), "--elastic", "--batch-size", "8",
                                     "--shard-size", "4096", *tiny_args()],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"extract exited {proc.returncode}: {proc.stderr.read()[-2000:]}")
            units = out / "units"
            if units.is_dir() and any(n.endswith(".json") for n in os.listdir(units)):
                seconds, rss = time.perf_counter() - t0, peak_rss_mb(proc.pid)
                break
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    manifest = json.loads((out / "manifest.json").read_text())
    return dict(seconds_to_first_unit=seconds, peak_rss_mb=rss, units=manifest["num_units"])


def startup(rows_list, work: Path, photos) -> list:
    out = []
    for rows in rows_list:
        tables = work / f"tables-{rows}"
        t = time.perf_counter()
        write_tables(tables, rows, photos)
        made = time.perf_counter() - t
        res = dict(rows=rows, files=len(os.listdir(tables)), **first_unit(tables, work / f"out-{rows}"))
        print(f"start-up {rows:>11,} rows ({res['files']} files, made in {made:.0f}s): first unit after "
              f"{res['seconds_to_first_unit']:.1f}s, peak RSS {res['peak_rss_mb']:.0f} MB", flush=True)
        out.append(res)
        shutil.rmtree(tables)
        shutil.rmtree(work / f"out-{rows}")
    return out


def synthetic_markers(url: str, n: int, storage_options=None) -> None:
    """n unit markers of one part each, every part a real (tiny) file, as a finished run leaves them."""
    from beit_jax.sinks import npy_bytes, parquet_bytes, unit_marker
    from beit_jax.storage import Folder

    folder = Folder(url, storage_options)
    npy = npy_bytes(np.zeros((1, 4), np.float32))
    meta = parquet_bytes({"id": [0], "path": ["x"]})
    import hashlib

    def one(u):
        stem = f"{u:07d}-0000"
        files = {f"pooled/{stem}.npy": npy, f"metadata/{stem}.parquet": meta}
        marker = {"unit": u, "process": 0, "rows": 1, "failed": [],
                  "parts": [{"stem": stem, "rows": 1, "files": {r: {"bytes": len(d), "sha256": hashlib.sha256(d).hexdigest()}
                                                               for r, d in files.items()}}]}
        return {**files, unit_marker(u): json.dumps(marker).encode()}

    if folder.local:
        for u in range(n):
            for rel, data in one(u).items():
                p = os.path.join(folder.root, rel)
                os.makedirs(os.path.dirname(p), exist_ok=True)
                with open(p, "wb") as f:
                    f.write(data)
    else:
        batch = {}
        for u in range(n):
            batch.update({folder.path(rel): data for rel, data in one(u).items()})
            if len(batch) >= 3000 or u == n - 1:
                folder.fs.pipe(batch)
                batch = {}


def finishing(url: str, n: int, storage_options=None) -> dict:
    from beit_jax.extract import Manifest
    from beit_jax.sinks import finished_units
    from beit_jax.storage import Folder

    t = time.perf_counter()
    synthetic_markers(url, n, storage_options)
    made = time.perf_counter() - t
    folder = Folder(url, storage_options)
    t = time.perf_counter()
    done, problems = finished_units(folder)
    resume_s = time.perf_counter() - t
    assert len(done) == n and not problems, problems[:3]
    t = time.perf_counter()
    Manifest(folder, {"num_units": n}).finalize(n)  # a finaliser that wrote none of the markers (elastic)
    finalize_s = time.perf_counter() - t
    t = time.perf_counter()
    Manifest(folder, {"num_units": n}).finalize(n, known=done)  # one that wrote or read them all (a plain run)
    finalize_known_s = time.perf_counter() - t
    where = "moto S3" if "://" in url else "local disk"
    print(f"{n:,} units on {where} (made in {made:.0f}s): resume scan {resume_s:.1f}s, finalize {finalize_s:.1f}s "
          f"reading every marker, {finalize_known_s:.1f}s with the markers it wrote", flush=True)
    return dict(units=n, storage=where, resume_scan_s=resume_s, finalize_s=finalize_s,
                finalize_known_s=finalize_known_s)


def moto(work: Path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=open(work / "moto.log", "w"),
                            stderr=subprocess.STDOUT)
    for _ in range(300):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.1)
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    return proc


def fleet(src: Path, out: Path, workers: int) -> float:
    args = ["extract", str(src), "--output", str(out), "--batch-size", "16", "--shard-size", "32",
            *tiny_args(*(["--elastic", "--lease-seconds", "30"] if workers else []))]
    t = time.perf_counter()
    procs = [subprocess.Popen(cli() + args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(max(1, workers))]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"extract exited {p.returncode}: {err[-2000:]}")
    return time.perf_counter() - t


def elastic(work: Path, worker_counts) -> list:
    src = work / "photos.txt"
    src.write_text("\n".join(str(p) for p in sorted(SAMPLE.iterdir())) + "\n")
    plain = fleet(src, work / "plain", 0)
    rows = [dict(workers="plain", seconds=plain, ratio_to_plain=1.0)]
    print(f"plain run: {plain:.1f}s", flush=True)
    for k in worker_counts:
        s = fleet(src, work / f"elastic-{k}", k)
        rows.append(dict(workers=k, seconds=s, ratio_to_plain=plain / s))
        print(f"{k} elastic workers: {s:.1f}s ({plain / s:.2f}x the plain run's speed)", flush=True)
    return rows


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1000000,20000000,100000000")
    ap.add_argument("--units", type=int, default=100_000)
    ap.add_argument("--s3-units", type=int, default=5000)
    ap.add_argument("--workers", default="1,2,3")
    ap.add_argument("--skip", default="", help="comma list of startup,finishing,elastic to leave out")
    args = ap.parse_args()
    if not SAMPLE.is_dir():
        sys.exit(f"{SAMPLE} not found: the benchmark reads ../shared/data/imagenet-sample")
    skip = set(filter(None, args.skip.split(",")))
    photos = sorted(SAMPLE.iterdir())[:8]
    out = HERE / "results"
    # sections left out (--skip) keep their last numbers
    results = json.loads((out / "scale.json").read_text()) if (out / "scale.json").exists() else {}
    results.update(machine=f"{_cpu_name()}, {os.cpu_count()} cores", date=time.strftime("%Y-%m-%d"))
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        work = Path(tmp)
        if "startup" not in skip:
            results["startup"] = startup([int(r) for r in args.rows.split(",")], work, photos)
        if "finishing" not in skip:
            results["finishing"] = [finishing(str(work / "markers"), args.units)]
            if args.s3_units:
                server = moto(work)
                try:
                    import s3fs

                    s3fs.S3FileSystem().mkdir("bench")
                    results["finishing"].append(finishing("s3://bench/markers", args.s3_units))
                finally:
                    server.terminate()
        if "elastic" not in skip:
            results["elastic"] = elastic(work, [int(k) for k in args.workers.split(",")])
    (out / "scale.json").write_text(json.dumps(results, indent=2) + "\n")
    md = [f"# Scale ({results['machine']}, {results['date']})", "",
          "Command: `.venv/bin/python benchmarks/bench_scale.py`. Tiny model (`test_beit`, random weights): the",
          "costs measured here are the framework's, not the model's.", ""]
    if "startup" in results:
        md += ["## Start-up and memory vs input rows (parquet tables, 1M rows per file)", "",
               "| rows | files | units | s to first finished unit | peak RSS MB |", "|---|---|---|---|---|"]
        md += [f"| {r['rows']:,} | {r['files']} | {r['units']:,} | {r['seconds_to_first_unit']:.1f} | "
               f"{r['peak_rss_mb']:.0f} |" for r in results["startup"]]
        md.append("")
    if "finishing" in results:
        md += ["## Finishing and resuming", "",
               "Resume scan: one listing plus every marker read in one batch (`finished_units`). Finalize:",
               "one listing, failures gathered; cold = the finaliser read every marker (an elastic worker that",
               "wrote none), own = it had written them (a single-process run).", "",
               "| units | storage | resume scan s | finalize cold s | finalize own s |", "|---|---|---|---|---|"]
        md += [f"| {r['units']:,} | {r['storage']} | {r['resume_scan_s']:.1f} | {r['finalize_s']:.1f} | "
               f"{r['finalize_known_s']:.1f} |" for r in results["finishing"]]
        md.append("")
    if "elastic" in results:
        md += ["## Elastic workers vs one plain run (1000 photos, wall time from launch to the last exit)", "",
               "| workers | s | speed vs plain |", "|---|---|---|"]
        md += [f"| {r['workers']} | {r['seconds']:.1f} | {r['ratio_to_plain']:.2f}x |" for r in results["elastic"]]
        md.append("")
    (out / "scale.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
