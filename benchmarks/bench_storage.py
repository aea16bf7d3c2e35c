"""Extraction from a local S3 server vs from a local folder, in one run; bytes per image on disk.

    .venv/bin/python benchmarks/bench_storage.py [--images 256] [--batch-size 32] [--rounds 2]

Starts moto's S3 server on 127.0.0.1 (`pip install "moto[server]" s3fs`), uploads the same images
from ../shared/data/imagenet-sample, then runs `beit_jax.extract.extract` end to end, interleaved:
local folder -> local output, then s3://bucket/imgs -> s3://bucket/out, for each model (the real
base model, and the tiny test model, whose compute is so small that reading and decoding are all
that is left), `--rounds` times each. Also the webdataset path: the images as tar shards on S3.
Reports median img/s and the S3/local ratio, and bytes per image of pooled/tokens outputs with
float32 and float16 storage. Writes benchmarks/results/storage.json and storage.md.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SAMPLE = HERE.parent.parent / "shared" / "data" / "imagenet-sample"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(log: Path):
    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)
    for _ in range(300):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, port
        time.sleep(0.1)
    raise RuntimeError("moto_server did not start")


def output_bytes(folder, output: str) -> int:
    return sum(size for rel, size in folder.sizes().items() if rel.startswith(output + "/"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()
    if not SAMPLE.is_dir():
        sys.exit(f"{SAMPLE} not found")
    work = Path(tempfile.mkdtemp(prefix="beit-storage-"))
    with moto_environment(work):
        run(args, work)


@contextlib.contextmanager
def moto_environment(work: Path):
    """moto's S3 server on loopback for the block, and the environment an S3 user sets for it."""
    proc, port = start_moto(work / "moto.log")
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    try:
        yield port
    finally:
        proc.terminate()


def run(args, work: Path):
    import jax
    import s3fs

    import beit_jax
    from beit_jax.extract import extract
    from beit_jax.storage import Folder

    images = sorted(SAMPLE.iterdir())[: args.images]
    local = work / "imgs"
    local.mkdir()
    for p in images:
        os.symlink(p, local / p.name)
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("bench")
    fs.put([str(p) for p in images], "bench/imgs/")
    per_shard = 64
    for s in range(0, len(images), per_shard):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            for p in images[s:s + per_shard]:
                tf.add(p, arcname=p.stem + ".jpg")
        fs.pipe_file(f"bench/shards/{s // per_shard:05d}.tar", buf.getvalue())
    n_shards = (len(images) + per_shard - 1) // per_shard

    sources = {"local folder": (str(local), lambda i: str(work / f"out-{i}")),
               "s3 objects": ("s3://bench/imgs", lambda i: f"s3://bench/out-{i}"),
               "s3 webdataset": (f"s3://bench/shards/{{00000..{n_shards - 1:05d}}}.tar", lambda i: f"s3://bench/wds-{i}")}
    models = {"base": beit_jax.create_model("beit_base_patch16_224", num_classes=0),
              "tiny (test_beit)": beit_jax.create_model("test_beit", num_classes=0)}
    results = {"images": len(images), "batch_size": args.batch_size, "workers": args.workers,
               "cpus": os.cpu_count(), "jax": jax.__version__, "runs": [], "sizes": []}
    count = 0
    for model_name, (model, variables) in models.items():
        for r in range(args.rounds):
            for src_name, (src, out) in sources.items():
                count += 1
                s = extract(src, out(count), model, variables, batch_size=args.batch_size, workers=args.workers,
                            progress=False)
                results["runs"].append(dict(model=model_name, source=src_name, round=r,
                                            img_per_s=s["images_per_sec"], steady_img_per_s=s["steady_images_per_sec"],
                                            decode_wait_s=s["decode_wait_s"], write_s=s["write_s"],
                                            images=s["images"]))
                print(f"{model_name:18s} {src_name:14s} round {r}: {s['steady_images_per_sec']:7.1f} img/s "
                      f"(decode wait {s['decode_wait_s']:.1f}s, write {s['write_s']:.1f}s)", flush=True)
    model, variables = models["base"]
    for dtype in ("float32", "float16"):
        count += 1
        out = str(work / f"size-{count}")
        extract(str(local), out, model, variables, batch_size=args.batch_size, outputs=["pooled", "tokens"],
                storage_dtype=dtype, progress=False)
        folder = Folder(out)
        for o in ("pooled", "tokens"):
            results["sizes"].append(dict(storage_dtype=dtype, output=o,
                                         bytes_per_image=output_bytes(folder, o) / len(images),
                                         metadata_bytes_per_image=output_bytes(folder, "metadata") / len(images)))
    write_report(results, args.out)


def write_report(res, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    (out / "storage.json").write_text(json.dumps(res, indent=2))
    lines = [f"{res['images']} ImageNet-sample JPEGs, global batch {res['batch_size']}, {res['workers']} decode "
             f"workers, {res['cpus']} CPUs, jax {res['jax']}; median steady-state img/s over rounds.", "",
             "| model | source | img/s | x local folder |", "|---|---|---|---|"]
    for model in dict.fromkeys(r["model"] for r in res["runs"]):
        med = {s: statistics.median(r["steady_img_per_s"] for r in res["runs"] if r["model"] == model
                                    and r["source"] == s) for s in dict.fromkeys(r["source"] for r in res["runs"])}
        for s, v in med.items():
            lines.append(f"| {model} | {s} | {v:.1f} | {v / med['local folder']:.2f} |")
    lines += ["", "| storage dtype | output | bytes per image | metadata bytes per image |", "|---|---|---|---|"]
    for s in res["sizes"]:
        lines.append(f"| {s['storage_dtype']} | {s['output']} | {s['bytes_per_image']:.0f} | "
                     f"{s['metadata_bytes_per_image']:.0f} |")
    (out / "storage.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
