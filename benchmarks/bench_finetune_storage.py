"""Fine-tuning img/s from a local S3 server (webdataset shards, an ImageFolder prefix) vs a local
ImageFolder, in one run.

    .venv/bin/python benchmarks/bench_finetune_storage.py [--images 128] [--batch-size 8] [--steps 12] [--rounds 2]

Starts moto's S3 server on 127.0.0.1, lays the same ImageNet-sample JPEGs out as a local
ImageFolder (10 classes), the same folder under s3://bench/train/, and webdataset shards (jpg +
cls) under s3://bench/shards/; then runs `beit_jax.finetune.train` (the CLI's loop: decode
workers, augmentation, the jitted step; output to S3 for the S3 sources) interleaved, `--rounds`
times, for the base model at 224 and the tiny test model at 64 (whose compute is so small that
reading and decoding are all that is left). Steady img/s: `train`'s steady_images_per_sec, the
steps after the first (compilation, pipeline fill) over their wall time; validation off. Writes
benchmarks/results/finetune_storage.json and .md.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_storage import SAMPLE, moto_environment  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=12, help="measured steps (after the first)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--models", default="base,tiny")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()
    if not SAMPLE.is_dir():
        sys.exit(f"{SAMPLE} not found")
    work = Path(tempfile.mkdtemp(prefix="beit-ftstorage-"))
    with moto_environment(work):
        run(args, work)


def run(args, work: Path):
    import jax
    import s3fs

    import beit_jax
    from beit_jax import finetune

    images = sorted(SAMPLE.iterdir())[: args.images]
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("bench")
    local = work / "train"
    for i, p in enumerate(images):
        (local / f"c{i % 10}").mkdir(parents=True, exist_ok=True)
        os.symlink(p, local / f"c{i % 10}" / p.name)
        fs.put_file(str(p), f"bench/train/c{i % 10}/{p.name}")
    per_shard = 16
    for s in range(0, len(images), per_shard):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            for i in range(s, min(s + per_shard, len(images))):
                tf.add(images[i], arcname=f"{i:06d}.jpg")
                cls = str(i % 10).encode()
                info = tarfile.TarInfo(f"{i:06d}.cls")
                info.size = len(cls)
                tf.addfile(info, io.BytesIO(cls))
        fs.pipe_file(f"bench/shards/{s // per_shard:05d}.tar", buf.getvalue())
    n_shards = (len(images) + per_shard - 1) // per_shard
    sources = {"local folder": str(local), "s3 folder": "s3://bench/train",
               "s3 webdataset": f"s3://bench/shards/{{00000..{n_shards - 1:05d}}}.tar"}
    models = {"base": dict(name="beit_base_patch16_224", img_size=224),
              "tiny (test_beit)": dict(name="test_beit", img_size=64)}
    models = {k: v for k, v in models.items() if k.split()[0] in args.models.split(",")}
    res = {"images": len(images), "batch_size": args.batch_size, "steps": args.steps, "workers": args.workers,
           "cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(), "jax": jax.__version__,
           "runs": []}
    count = 0
    for model_name, m in models.items():
        for r in range(args.rounds):
            for src_name, src in sources.items():
                count += 1
                out = str(work / f"run-{count}") if src_name == "local folder" else f"s3://bench/runs/{count}"
                model, variables = beit_jax.create_model(m["name"], num_classes=10, img_size=m["img_size"])
                cfg = finetune.TrainConfig(total_steps=1 + args.steps, warmup_steps=1, lr=1e-4)
                o = finetune.train(model, variables, src, output_dir=out, batch_size=args.batch_size, cfg=cfg,
                                   workers=args.workers, checkpoint_every=10 ** 6, progress=False,
                                   log=lambda *a, **k: None)
                ips = o["steady_images_per_sec"]
                res["runs"].append(dict(model=model_name, source=src_name, round=r, img_per_s=ips,
                                        seconds=o["seconds"]))
                print(f"{model_name:18s} {src_name:14s} round {r}: {ips:7.2f} img/s", flush=True)
    write_report(res, args.out)


def write_report(res, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    (out / "finetune_storage.json").write_text(json.dumps(res, indent=2))
    lines = [f"Fine-tuning, {res['images']} ImageNet-sample JPEGs in 10 classes, global batch {res['batch_size']}, "
             f"{res['steps']} measured steps, {res['workers']} decode workers, {res['cpus']} CPUs ({res['cpu']}), "
             f"jax {res['jax']}; median img/s over rounds; S3 = moto on 127.0.0.1 (S3 runs write their output "
             f"to S3 too).", "", "| model | source | img/s | x local folder |", "|---|---|---|---|"]
    for model in dict.fromkeys(r["model"] for r in res["runs"]):
        med = {s: statistics.median(r["img_per_s"] for r in res["runs"] if r["model"] == model and r["source"] == s)
               for s in dict.fromkeys(r["source"] for r in res["runs"])}
        for s, v in med.items():
            lines.append(f"| {model} | {s} | {v:.2f} | {v / med['local folder']:.2f} |")
    (out / "finetune_storage.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
