"""Extraction pipeline on ../shared/data/imagenet-sample: where the host's time goes, the
framework's own ceiling, --decode fast, decode-only, model-only and end-to-end.

    .venv/bin/python benchmarks/bench_pipeline.py [--images 256] [--batch-size 32] [--skip model,e2e]
    .venv/bin/python benchmarks/bench_pipeline.py --device gpu   # bf16, batch 256 per device, decode
                                                                 # workers = all host cores

1. breakdown: per image on one core, read / decode / resize + crop / copy, for the sample's
   ImageNet-size photos and for the same photos re-encoded at 2048 px (~3 MP), exact and fast;
2. ceiling: `extract` with decoding and the model free (a constant crop, a zeros forward): the
   rows/s the framework itself moves (plan, batching, transfer, tracking, writing, finalising);
3. fidelity: --decode fast vs exact (pixels, pooled-feature cosine, top-1 agreement);
4. pipeline only: decode + timm-exact resize/crop into fixed uint8 batches, per worker count and
   backend (threads / spawned processes), exact and fast, no model;
5. model only: the extraction forward (uint8 in, pooled features out) on synthetic batches, for
   both parallel paths and both dtypes;
6. end to end: `beit_jax.extract.extract` over the same images (random weights), per worker count.
On GPU the image list repeats the sample (--images 8192) so the run lasts long enough to measure,
and decode uses every host core (threads and processes), since decode is the ceiling there.
Writes benchmarks/results/pipeline[-gpu].json and .md (sections skipped keep their last results).
"""
from __future__ import annotations

import argparse
import itertools
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


def pipeline_only(refs, transform, batch, workers, backend, decode="exact"):
    from beit_jax.data import Decoder, stream_batches

    with Decoder(transform, workers=workers, backend=backend, window=max(2 * batch, 16), decode=decode) as dec:
        for _ in stream_batches(refs[:batch], batch, dec, (224, 224, 3)):  # workers started: steady state
            pass
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


def end_to_end(model, variables, src, batch, parallel, workers, backend, decode="exact"):
    from beit_jax.extract import extract

    out = tempfile.mkdtemp(prefix="beit-bench-")
    try:
        s = extract(src, out, model, variables, batch_size=batch, parallel=parallel, workers=workers,
                    backend=backend, progress=False, decode=decode)
        return s
    finally:
        shutil.rmtree(out, ignore_errors=True)


def large_jpegs(paths, folder: Path, long_side: int = 2048, quality: int = 90):
    """The photos re-encoded with their long side at `long_side` (about 3 MP at 2048): the size of
    web photos in LAION-style collections. Upscaled, so they hold less fine detail than real large
    photos; decode cost follows the pixel count either way."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for p in paths:
        dst = folder / (Path(p).stem + ".jpg")
        if not dst.exists():
            img = Image.open(p).convert("RGB")
            s = long_side / max(img.size)
            img.resize((round(img.width * s), round(img.height * s)), Image.BICUBIC).save(dst, "JPEG", quality=quality)
        out.append(dst)
    return out


def breakdown(paths, transform):
    """One core, per image (ms): read the file, decode it (exact: full size; fast: Pillow's DCT
    draft when at least 2x the resize size), resize + crop, copy to the uint8 array."""
    from beit_jax.transforms import load_image, to_uint8_array

    t = {k: 0.0 for k in ("read", "decode", "resize_crop", "copy", "fast_decode", "fast_resize_crop")}
    for p in paths:
        t0 = time.perf_counter()
        data = Path(p).read_bytes()
        t1 = time.perf_counter()
        img = load_image(data)
        t2 = time.perf_counter()
        crop = transform.resize_and_crop(img)
        t3 = time.perf_counter()
        to_uint8_array(crop)
        t4 = time.perf_counter()
        fimg = load_image(data, resized_size=transform.resized_size)
        t5 = time.perf_counter()
        transform.resize_and_crop(fimg)
        t6 = time.perf_counter()
        for k, dt in zip(t, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5)):
            t[k] += dt
    ms = {k: 1000 * v / len(paths) for k, v in t.items()}
    exact = ms["read"] + ms["decode"] + ms["resize_crop"] + ms["copy"]
    fast = ms["read"] + ms["fast_decode"] + ms["fast_resize_crop"] + ms["copy"]
    return dict(ms, exact_img_per_s_per_core=1000 / exact, fast_img_per_s_per_core=1000 / fast,
                fast_speedup=exact / fast)


def noop_ceiling(rows: int, batch: int, image: str, shard_size: int = 4096):
    """Rows per second `extract` moves when decoding and the model are free: every input
    'decodes' to one constant crop and the forward returns zeros, so what is timed is the
    framework itself (listing, plan, batching, host->device transfer, unit tracking, writing
    npy + parquet parts and markers, finalising)."""
    import jax.numpy as jnp

    import beit_jax
    import beit_jax.extract as ex
    from beit_jax.data import PAD, Decoder

    class FreeDecoder(Decoder):
        def imap(self, refs):
            crop = np.zeros((*self.transform.size, 3), np.uint8)
            for r in refs:
                yield PAD if r is None else (crop, None)

    def free_forward(model, outputs, mean, std):
        def forward(variables, images):  # zeros that depend on the batch, so nothing is skipped
            return {"pooled": jnp.zeros((images.shape[0], model.embed_dim), jnp.float32) + images[:, 0, 0, :1] * 0}
        return forward

    model, variables = beit_jax.create_model("test_beit", num_classes=0)
    tmp = Path(tempfile.mkdtemp(prefix="beit-ceiling-"))
    lst = tmp / "inputs.txt"
    lst.write_text((image + "\n") * rows)
    saved = ex.Decoder, ex.make_forward
    ex.Decoder, ex.make_forward = FreeDecoder, free_forward
    try:
        t = time.perf_counter()
        s = ex.extract(str(lst), str(tmp / "out"), model, variables, batch_size=batch, shard_size=shard_size,
                       progress=False)
        total = time.perf_counter() - t
    finally:
        ex.Decoder, ex.make_forward = saved
        shutil.rmtree(tmp, ignore_errors=True)
    return dict(rows=rows, batch_size=batch, shard_size=shard_size, rows_per_s=rows / total,
                steady_rows_per_s=s["steady_images_per_sec"], seconds=total)


def fidelity(paths, transform, arch="beit_base_patch16_224", batch=16):
    """--decode fast vs exact on the same files: mean |pixel difference| of the 224 crops, and
    cosine similarity of pooled features and top-1 agreement of a BEiT-B with random weights (no
    trained weights can be downloaded here: with them, the agreement means more)."""
    import jax

    import beit_jax
    from beit_jax.data import decode
    from beit_jax.sources import ImageRef
    from beit_jax.transforms import normalize

    model, variables = beit_jax.create_model(arch, num_classes=1000)
    mean, std = transform.mean, transform.std
    fwd = jax.jit(lambda v, x: (model.apply(v, x, method="forward_features")))

    def run(fast):
        crops = [decode(ImageRef(str(p), str(p)), transform, fast)[0] for p in paths]
        feats, logits = [], []
        for i in range(0, len(crops), batch):
            x = normalize(np.stack(crops[i:i + batch]), mean, std)
            tokens = fwd(variables, x)
            pooled = model.apply(variables, tokens, pre_logits=True, method="forward_head")
            feats.append(np.asarray(pooled))
            logits.append(np.asarray(model.apply(variables, tokens, method="forward_head")))
        return np.stack(crops), np.concatenate(feats), np.concatenate(logits)

    (ce, fe, le), (cf, ff, lf) = run(False), run(True)
    cos = (fe * ff).sum(1) / (np.linalg.norm(fe, axis=1) * np.linalg.norm(ff, axis=1))
    return dict(n=len(paths), pixel_mean_abs_diff=float(np.abs(ce.astype(np.int16) - cf).mean()),
                changed_images=int(sum(not np.array_equal(a, b) for a, b in zip(ce, cf))),
                cosine_mean=float(cos.mean()), cosine_min=float(cos.min()),
                top1_agreement=float((le.argmax(1) == lf.argmax(1)).mean()))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--images", type=int, default=None, help="default: 256 (CPU), 8192 (GPU; the sample repeats)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: 32 (CPU), 256 per device (GPU)")
    ap.add_argument("--src", type=Path, default=SAMPLE)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--large-images", type=int, default=64, help="photos re-encoded at 2048 px for the large rows")
    ap.add_argument("--skip", default="", help="comma list of sections to leave as they are in pipeline.json: "
                                               "breakdown, ceiling, fidelity, pipeline, model, e2e")
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

    refs = list(itertools.islice(list_inputs(str(args.src)).refs(), args.images))
    lst = Path(tempfile.mkdtemp()) / "inputs.txt"
    lst.write_text("\n".join(r.path for r in refs) + "\n")
    transform = create_transform(**beit_jax.resolve_data_config("beit_base_patch16_224"))
    bs = args.batch_size
    skip = set(filter(None, args.skip.split(",")))
    args.out.mkdir(parents=True, exist_ok=True)
    old = json.loads((args.out / "pipeline.json").read_text()) if (args.out / "pipeline.json").exists() else {}
    res = dict(old, images=len(refs), batch_size=bs, cpus=os.cpu_count(), cpu=cpu_model())
    large = large_jpegs([r.path for r in refs[:args.large_images]], Path(tempfile.gettempdir()) / "beit-bench-large")

    if "breakdown" not in skip:
        res["breakdown"] = []
        for name, paths in (("imagenet-sample (~500x375)", [r.path for r in refs]), ("re-encoded 2048 px (~3 MP)", large)):
            breakdown(paths[:8], transform)  # warm the page cache and Pillow
            row = dict(images=name, n=len(paths), **breakdown(paths, transform))
            res["breakdown"].append(row)
            print(f"breakdown {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items() if isinstance(v, float)),
                  flush=True)
    if "ceiling" not in skip:
        res["ceiling"] = [noop_ceiling(n, 256, refs[0].path) for n in (20000, 100000)]
        for r in res["ceiling"]:
            print(f"no-op ceiling: {r['rows']} rows, {r['rows_per_s']:.0f} rows/s (steady {r['steady_rows_per_s']:.0f})",
                  flush=True)
    if "fidelity" not in skip:
        res["fidelity"] = [dict(images="re-encoded 2048 px (~3 MP)", **fidelity(large, transform)),
                           dict(images="imagenet-sample as is", **fidelity([r.path for r in refs[:args.large_images]],
                                                                            transform))]
        for r in res["fidelity"]:
            print(f"fidelity {r['images']}: {r}", flush=True)

    if "pipeline" not in skip:
        res["pipeline_only"] = []
        for backend in ("thread", "process"):
            for w in ([0, 1, 2, 3, 4] if backend == "thread" else [1, 2, 3]):
                for mode, paths in (("exact", refs), ("exact", large), ("fast", large)):
                    from beit_jax.sources import ImageRef
                    rs = paths if paths is refs else [ImageRef(str(p), str(p)) for p in paths]
                    ips = pipeline_only(rs, transform, bs, w, backend, mode)
                    what = "imagenet-sample" if paths is refs else "2048 px"
                    res["pipeline_only"].append(dict(backend=backend, workers=w, images=what, decode=mode,
                                                     img_per_s=ips))
                    print(f"pipeline only  {backend:7s} workers={w} {what} {mode}: {ips:7.1f} img/s", flush=True)

    models = {}
    if "model" not in skip or "e2e" not in skip:
        models = {dt: beit_jax.create_model("beit_base_patch16_224", num_classes=0, dtype=d)
                  for dt, d in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16))}
    if "model" not in skip:
        res["model_only"] = []
        for dt, (model, variables) in models.items():
            for parallel in ("sharded", "pmap"):
                ips = model_only(model, variables, bs, parallel)
                res["model_only"].append(dict(dtype=dt, parallel=parallel, img_per_s=ips))
                print(f"model only     {dt} {parallel}: {ips:6.2f} img/s", flush=True)

    if "e2e" not in skip:
        res["end_to_end"] = []
        e2e = [("float32", "sharded", 1, "thread"), ("float32", "sharded", 2, "thread"),
               ("float32", "sharded", 3, "thread"), ("float32", "pmap", 2, "thread"),
               ("float32", "sharded", 2, "process"), ("bfloat16", "sharded", 2, "thread")]
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

    (args.out / "pipeline.json").write_text(json.dumps(res, indent=2))
    md = markdown(res, jax.__version__, jax.device_count())
    (args.out / "pipeline.md").write_text(md)
    print(md)


def cpu_model() -> str:
    from bench_model import _cpu_name  # the same CPU line as the model tables

    return _cpu_name()


def markdown(res, jax_version, devices) -> str:
    md = [f"{res['images']} images of imagenet-sample, global batch {res['batch_size']}, {res['cpus']} CPUs "
          f"({res.get('cpu', '?')}), jax {jax_version}, {devices} device(s).", ""]
    if res.get("breakdown"):
        md += ["Host pipeline per image on one core (ms; `fast` = `--decode fast`):", "",
               "| images | read | decode | resize+crop | copy | exact img/s/core | fast decode | fast resize+crop | "
               "fast img/s/core | fast speedup |", "|---|---|---|---|---|---|---|---|---|---|"]
        md += [f"| {r['images']} | {r['read']:.2f} | {r['decode']:.2f} | {r['resize_crop']:.2f} | {r['copy']:.3f} | "
               f"{r['exact_img_per_s_per_core']:.0f} | {r['fast_decode']:.2f} | {r['fast_resize_crop']:.2f} | "
               f"{r['fast_img_per_s_per_core']:.0f} | {r['fast_speedup']:.2f}x |" for r in res["breakdown"]]
        md.append("")
    if res.get("ceiling"):
        per_core = max((r["exact_img_per_s_per_core"] for r in res.get("breakdown", [])), default=None)
        md += ["The framework's own ceiling: `extract` with decoding and the model free (every input a constant "
               "crop, the forward zeros), batch 256, units of 4096 rows, writing npy + parquet:", "",
               "| rows | rows/s (all of it) | steady rows/s | x exact decode per core |", "|---|---|---|---|"]
        md += [f"| {r['rows']} | {r['rows_per_s']:.0f} | {r['steady_rows_per_s']:.0f} | "
               f"{r['rows_per_s'] / per_core:.0f}x |" if per_core else
               f"| {r['rows']} | {r['rows_per_s']:.0f} | {r['steady_rows_per_s']:.0f} | - |" for r in res["ceiling"]]
        md.append("")
    if res.get("fidelity"):
        md += ["`--decode fast` vs exact on the same files (BEiT-B, random weights: none can be downloaded here):", "",
               "| images | n | images changed | mean abs pixel diff (of 255) | pooled cosine mean | min | "
               "top-1 agreement |", "|---|---|---|---|---|---|---|"]
        md += [f"| {r['images']} | {r['n']} | {r['changed_images']} | "
               f"{r['pixel_mean_abs_diff']:.3f} | {r['cosine_mean']:.5f} | {r['cosine_min']:.5f} | "
               f"{r['top1_agreement']:.3f} |" for r in res["fidelity"]]
        md.append("")
    if res.get("pipeline_only"):
        md += ["Pipeline only (read + decode + resize + crop into batches, no model; after one batch has started "
               "the workers):", "",
               "| backend | workers | images | decode | img/s |", "|---|---|---|---|---|"]
        md += [f"| {r['backend']} | {r['workers']} | {r.get('images', 'imagenet-sample')} | {r.get('decode', 'exact')} | "
               f"{r['img_per_s']:.1f} |" for r in res["pipeline_only"]]
        md.append("")
    if res.get("model_only"):
        md += ["Model only (extraction forward, uint8 in, pooled out):", "", "| dtype | parallel | img/s |",
               "|---|---|---|"]
        md += [f"| {r['dtype']} | {r['parallel']} | {r['img_per_s']:.2f} |" for r in res["model_only"]]
        md.append("")
    if res.get("end_to_end"):
        md += ["End to end (`extract` incl. decode, transfer and writing; steady = after the first batch, "
               "total = with model start-up and compile):", "",
               "| dtype | parallel | decode | workers | steady img/s | x model only | total img/s | waited on decode s |",
               "|---|---|---|---|---|---|---|---|"]
        md += [f"| {r['dtype']} | {r['parallel']} | {r['backend']} | {r['workers']} | {r['steady_img_per_s']:.2f} | "
               f"{r['vs_model_only']:.2f} | {r['img_per_s']:.2f} | {r['decode_wait_s']:.1f} |"
               for r in res["end_to_end"]]
    return "\n".join(md) + "\n"


def main_gpu(args):
    """bf16 extraction on every GPU: decode-only with all host cores, model-only, end to end."""
    import jax
    import jax.numpy as jnp

    import beit_jax
    from beit_jax.sources import list_inputs
    from beit_jax.transforms import create_transform

    if jax.default_backend() != "gpu":
        sys.exit(f"--device gpu: JAX's backend is {jax.default_backend()}")
    cores = os.cpu_count()
    sample = list(list_inputs(str(args.src)).refs())
    n = args.images or 8192
    refs = [sample[i % len(sample)] for i in range(n)]
    lst = Path(tempfile.mkdtemp()) / "inputs.txt"
    lst.write_text("\n".join(r.path for r in refs) + "\n")
    transform = create_transform(**beit_jax.resolve_data_config("beit_base_patch16_224"))
    bs = args.batch_size or 256 * jax.device_count()
    res = {"device": "gpu", "device_kind": jax.devices()[0].device_kind, "devices": jax.device_count(),
           "images": n, "batch_size": bs, "cpus": cores, "pipeline_only": [], "model_only": [], "end_to_end": []}
    from beit_jax.sources import ImageRef
    large = large_jpegs([r.path for r in sample[:256]], Path(tempfile.gettempdir()) / "beit-bench-large")
    large_refs = [ImageRef(str(large[i % len(large)]), str(large[i % len(large)])) for i in range(min(n, 4096))]
    large_lst = Path(tempfile.mkdtemp()) / "large.txt"
    large_lst.write_text("\n".join(r.path for r in large_refs) + "\n")
    for backend in ("thread", "process"):
        for what, rs, mode in (("imagenet-sample", refs[: min(n, 4096)], "exact"), ("2048 px", large_refs, "exact"),
                               ("2048 px", large_refs, "fast")):
            ips = pipeline_only(rs, transform, bs, cores, backend, mode)
            res["pipeline_only"].append(dict(backend=backend, workers=cores, images=what, decode=mode, img_per_s=ips))
            print(f"pipeline only  {backend:7s} workers={cores} {what} {mode}: {ips:7.1f} img/s", flush=True)
    for arch in ("beit_base_patch16_224", "beit_large_patch16_224"):
        model, variables = beit_jax.create_model(arch, num_classes=0, dtype=jnp.bfloat16)
        mo = model_only(model, variables, bs, "sharded", steps=20)
        res["model_only"].append(dict(model=arch, dtype="bfloat16", attention=model.attention_impl()[0], img_per_s=mo))
        print(f"model only     {arch} bf16 ({model.attention_impl()[0]}): {mo:7.1f} img/s", flush=True)
        for backend, what, src, mode in (("thread", "imagenet-sample", lst, "exact"),
                                         ("process", "imagenet-sample", lst, "exact"),
                                         ("thread", "2048 px", large_lst, "exact"), ("thread", "2048 px", large_lst, "fast")):
            s = end_to_end(model, variables, str(src), bs, "sharded", cores, backend, mode)
            row = dict(model=arch, backend=backend, images=what, decode=mode, workers=cores, img_per_s=s["images_per_sec"],
                       steady_img_per_s=s["steady_images_per_sec"], vs_model_only=s["steady_images_per_sec"] / mo,
                       decode_wait_s=s["decode_wait_s"], device_wait_s=s["device_wait_s"], seconds=s["seconds"])
            res["end_to_end"].append(row)
            print(f"end to end     {arch} {backend} {what} {mode} workers={cores}: {row['steady_img_per_s']:7.1f} img/s steady "
                  f"({row['vs_model_only']:.2f}x model only; waited {row['decode_wait_s']:.1f}s on decode)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pipeline-gpu.json").write_text(json.dumps(res, indent=2))
    md = [f"{n} inputs (imagenet-sample repeated), global batch {bs}, bf16, {res['devices']} x {res['device_kind']}, "
          f"{cores} host cores decoding, jax {jax.__version__}.", "",
          "| stage | model | decode | workers | img/s | x model only | waited on decode s |",
          "|---|---|---|---|---|---|---|"]
    md += [f"| decode only ({r['images']}, {r['decode']}) | - | {r['backend']} | {r['workers']} | {r['img_per_s']:.0f} | "
           f"- | - |" for r in res["pipeline_only"]]
    md += [f"| model only | {r['model']} | - | - | {r['img_per_s']:.0f} | 1.00 | - |" for r in res["model_only"]]
    md += [f"| end to end (steady; {r['images']}, {r['decode']}) | {r['model']} | {r['backend']} | {r['workers']} | "
           f"{r['steady_img_per_s']:.0f} | "
           f"{r['vs_model_only']:.2f} | {r['decode_wait_s']:.1f} |" for r in res["end_to_end"]]
    (args.out / "pipeline-gpu.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
