"""Extraction pipeline on ../shared/data/imagenet-sample: decode-only, model-only and end-to-end.

    .venv/bin/python benchmarks/bench_pipeline.py [--images 256] [--batch-size 32]
    .venv/bin/python benchmarks/bench_pipeline.py --device gpu   # bf16, batch 256 per device, decode
                                                                 # workers = all host cores

1. pipeline only: decode + timm-exact resize/crop into fixed uint8 batches, per worker count and
   backend (threads / spawned processes), no model;
2. model only: the extraction forward (uint8 in, pooled features out) on synthetic batches, for
   both parallel paths and both dtypes;
3. end to end: `beit_jax.extract.extract` over the same images (random weights), per worker count.
On GPU the image list repeats the sample (--images 8192) so the run lasts long enough to measure,
and decode uses every host core (threads and processes), since decode is the ceiling there.
Writes benchmarks/results/pipeline[-gpu].json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
SAMPLE = HERE.parent.parent / "shared" / "data" / "imagenet-sample"


def pipeline_only(refs, transform, batch, workers, backend):
    from beit_jax.data import Decoder, stream_batches

    with Decoder(transform, workers=workers, backend=backend, window=max(2 * batch, 16)) as dec:
        t = time.perf_counter()
        n = 0
        for hb in stream_batches(refs, batch, dec, (224, 224, 3)):
            n += int(hb.valid.sum())
        return n / (time.perf_counter() - t)


def model_only(model, variables, batch, parallel, steps=6):
    from beit_jax import parallel as par
    from beit_jax.extract import make_forward
    from beit_jax import cast_for_inference

    dp = par.DataParallel(parallel)
    step = dp.inference_step(make_forward(model, ["pooled"], (0.5,) * 3, (0.5,) * 3))
    params = dp.replicate(cast_for_inference(model, variables))
    x = np.random.RandomState(0).randint(0, 256, (dp.local_batch_size(batch), 224, 224, 3)).astype(np.uint8)
    dp.fetch(step(params, dp.put_batch(x)))  # compile
    t = time.perf_counter()
    outs = [step(params, dp.put_batch(x)) for _ in range(steps)]  # dispatch ahead, as extract does
    for o in outs:
        dp.fetch(o)
    return steps * batch / (time.perf_counter() - t)


def end_to_end(model, variables, src, batch, parallel, workers, backend):
    from beit_jax.extract import extract

    out = tempfile.mkdtemp(prefix="beit-bench-")
    try:
        s = extract(src, out, model, variables, batch_size=batch, parallel=parallel, workers=workers,
                    backend=backend, progress=False)
        return s
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--images", type=int, default=None, help="default: 256 (CPU), 8192 (GPU; the sample repeats)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: 32 (CPU), 256 per device (GPU)")
    ap.add_argument("--src", type=Path, default=SAMPLE)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()
    if not args.src.is_dir():
        sys.exit(f"{args.src} not found: pass --src with a folder of images")
    if args.device == "gpu":
        return main_gpu(args)
    args.images = args.images or 256
    args.batch_size = args.batch_size or 32

    import jax
    import jax.numpy as jnp

    import beit_jax
    from beit_jax.sources import list_inputs
    from beit_jax.transforms import create_transform

    refs = list_inputs(str(args.src)).items[: args.images]
    lst = Path(tempfile.mkdtemp()) / "inputs.txt"
    lst.write_text("\n".join(r.path for r in refs) + "\n")
    transform = create_transform(**beit_jax.resolve_data_config("beit_base_patch16_224"))
    bs = args.batch_size
    res = {"images": len(refs), "batch_size": bs, "cpus": os.cpu_count(), "pipeline_only": [], "model_only": [],
           "end_to_end": []}

    for backend in ("thread", "process"):
        for w in ([0, 1, 2, 3, 4] if backend == "thread" else [1, 2, 3]):
            ips = pipeline_only(refs, transform, bs, w, backend)
            res["pipeline_only"].append(dict(backend=backend, workers=w, img_per_s=ips))
            print(f"pipeline only  {backend:7s} workers={w}: {ips:7.1f} img/s", flush=True)

    models = {dt: beit_jax.create_model("beit_base_patch16_224", num_classes=0, dtype=d)
              for dt, d in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16))}
    for dt, (model, variables) in models.items():
        for parallel in ("sharded", "pmap"):
            ips = model_only(model, variables, bs, parallel)
            res["model_only"].append(dict(dtype=dt, parallel=parallel, img_per_s=ips))
            print(f"model only     {dt} {parallel}: {ips:6.2f} img/s", flush=True)

    e2e = [("float32", "sharded", 1, "thread"), ("float32", "sharded", 2, "thread"), ("float32", "sharded", 3, "thread"),
           ("float32", "pmap", 2, "thread"), ("float32", "sharded", 2, "process"), ("bfloat16", "sharded", 2, "thread")]
    for dt, parallel, w, backend in e2e:
        model, variables = models[dt]
        s = end_to_end(model, variables, str(lst), bs, parallel, w, backend)
        mo = next(m["img_per_s"] for m in res["model_only"] if m["dtype"] == dt and m["parallel"] == parallel)
        row = dict(dtype=dt, parallel=parallel, workers=w, backend=backend, img_per_s=s["images_per_sec"],
                   steady_img_per_s=s["steady_images_per_sec"], vs_model_only=s["steady_images_per_sec"] / mo,
                   decode_wait_s=s["decode_wait_s"],
                   device_wait_s=s["device_wait_s"], seconds=s["seconds"])
        res["end_to_end"].append(row)
        print(f"end to end     {dt} {parallel} {backend} workers={w}: {row['steady_img_per_s']:6.2f} img/s steady, "
              f"{row['img_per_s']:6.2f} with start-up "
              f"({row['vs_model_only']:.2f}x model only; waited {row['decode_wait_s']:.1f}s on decode)", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pipeline.json").write_text(json.dumps(res, indent=2))
    md = [f"{len(refs)} images of imagenet-sample, global batch {bs}, {os.cpu_count()} CPUs, jax {jax.__version__}, "
          f"{jax.device_count()} device(s).", "", "Pipeline only (decode + resize + crop, no model):", "",
          "| backend | workers | img/s |", "|---|---|---|"]
    md += [f"| {r['backend']} | {r['workers']} | {r['img_per_s']:.1f} |" for r in res["pipeline_only"]]
    md += ["", "Model only (extraction forward, uint8 in, pooled out):", "", "| dtype | parallel | img/s |", "|---|---|---|"]
    md += [f"| {r['dtype']} | {r['parallel']} | {r['img_per_s']:.2f} |" for r in res["model_only"]]
    md += ["", "End to end (`extract` incl. decode, transfer and writing; steady = after the first batch, "
           "total = with model start-up and compile):", "",
           "| dtype | parallel | decode | workers | steady img/s | x model only | total img/s | waited on decode s |",
           "|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['dtype']} | {r['parallel']} | {r['backend']} | {r['workers']} | {r['steady_img_per_s']:.2f} | "
           f"{r['vs_model_only']:.2f} | {r['img_per_s']:.2f} | {r['decode_wait_s']:.1f} |" for r in res["end_to_end"]]
    (args.out / "pipeline.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def main_gpu(args):
    """bf16 extraction on every GPU: decode-only with all host cores, model-only, end to end."""
    import jax
    import jax.numpy as jnp

    import beit_jax
    from beit_jax.data import list_images
    from beit_jax.transforms import create_transform

    if jax.default_backend() != "gpu":
        sys.exit(f"--device gpu: JAX's backend is {jax.default_backend()}")
    cores = os.cpu_count()
    sample = list_images(str(args.src))
    n = args.images or 8192
    refs = [sample[i % len(sample)] for i in range(n)]
    lst = Path(tempfile.mkdtemp()) / "inputs.txt"
    lst.write_text("\n".join(r.path for r in refs) + "\n")
    transform = create_transform(**beit_jax.resolve_data_config("beit_base_patch16_224"))
    bs = args.batch_size or 256 * jax.device_count()
    res = {"device": "gpu", "device_kind": jax.devices()[0].device_kind, "devices": jax.device_count(),
           "images": n, "batch_size": bs, "cpus": cores, "pipeline_only": [], "model_only": [], "end_to_end": []}
    for backend in ("thread", "process"):
        ips = pipeline_only(refs[: min(n, 4096)], transform, bs, cores, backend)
        res["pipeline_only"].append(dict(backend=backend, workers=cores, img_per_s=ips))
        print(f"pipeline only  {backend:7s} workers={cores}: {ips:7.1f} img/s", flush=True)
    for arch in ("beit_base_patch16_224", "beit_large_patch16_224"):
        model, variables = beit_jax.create_model(arch, num_classes=0, dtype=jnp.bfloat16)
        mo = model_only(model, variables, bs, "sharded", steps=20)
        res["model_only"].append(dict(model=arch, dtype="bfloat16", attention=model.attention_impl()[0], img_per_s=mo))
        print(f"model only     {arch} bf16 ({model.attention_impl()[0]}): {mo:7.1f} img/s", flush=True)
        for backend in ("thread", "process"):
            s = end_to_end(model, variables, str(lst), bs, "sharded", cores, backend)
            row = dict(model=arch, backend=backend, workers=cores, img_per_s=s["images_per_sec"],
                       steady_img_per_s=s["steady_images_per_sec"], vs_model_only=s["steady_images_per_sec"] / mo,
                       decode_wait_s=s["decode_wait_s"], device_wait_s=s["device_wait_s"], seconds=s["seconds"])
            res["end_to_end"].append(row)
            print(f"end to end     {arch} {backend} workers={cores}: {row['steady_img_per_s']:7.1f} img/s steady "
                  f"({row['vs_model_only']:.2f}x model only; waited {row['decode_wait_s']:.1f}s on decode)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pipeline-gpu.json").write_text(json.dumps(res, indent=2))
    md = [f"{n} inputs (imagenet-sample repeated), global batch {bs}, bf16, {res['devices']} x {res['device_kind']}, "
          f"{cores} host cores decoding, jax {jax.__version__}.", "",
          "| stage | model | decode | workers | img/s | x model only | waited on decode s |",
          "|---|---|---|---|---|---|---|"]
    md += [f"| decode only | - | {r['backend']} | {r['workers']} | {r['img_per_s']:.0f} | - | - |"
           for r in res["pipeline_only"]]
    md += [f"| model only | {r['model']} | - | - | {r['img_per_s']:.0f} | 1.00 | - |" for r in res["model_only"]]
    md += [f"| end to end (steady) | {r['model']} | {r['backend']} | {r['workers']} | {r['steady_img_per_s']:.0f} | "
           f"{r['vs_model_only']:.2f} | {r['decode_wait_s']:.1f} |" for r in res["end_to_end"]]
    (args.out / "pipeline-gpu.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
