"""Segmentation throughput: beit-jax's BeitSegmenter vs transformers' PyTorch BeitForSemanticSegmentation.

    .venv/bin/python benchmarks/bench_segmentation.py [--sizes 512,640] [--batch 1] [--rounds 3]

The ADE20K base architecture (BEiT-B, FPN, UPerNet with 768 channels, auxiliary head) with random
weights, at each size: transformers eager (float32, torch's threads) and beit-jax `jax.jit(model.apply)`
in float32 and bfloat16 take turns, round after round, in one process, so machine noise hits them
alike; each subject runs for --target-seconds per round. Logits only (no upsampling or argmax).
Writes benchmarks/results/segmentation.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def timed(fn, target_s: float) -> float:
    fn()  # warm (compiled / caches)
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < target_s or n < 2:
        fn()
        n += 1
    return (time.perf_counter() - t) / n


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="512,640")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--target-seconds", type=float, default=4.0)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import torch
    from bench_model import _cpu_name
    from transformers import BeitConfig, BeitForSemanticSegmentation

    from beit_jax.models.segmentation import BeitSegmenter, SegConfig, init_segmenter

    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        cfg = SegConfig(image_size=size)
        hf = BeitForSemanticSegmentation(BeitConfig(**{k: v for k, v in cfg.to_hf().items()
                                                       if k not in ("architectures", "model_type")})).eval()
        x = np.random.RandomState(0).randn(args.batch, size, size, 3).astype(np.float32)
        xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
        subjects = {}

        def torch_fwd():
            with torch.no_grad():
                hf(xt).logits.numpy()
        subjects["transformers eager float32"] = torch_fwd
        for name, dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
            model = BeitSegmenter(cfg, dtype=dtype)
            variables = init_segmenter(BeitSegmenter(cfg), 0)
            fn = jax.jit(lambda v, x, m=model: m.apply(v, x))
            xj = jnp.asarray(x)
            t0 = time.perf_counter()
            fn(variables, xj).block_until_ready()
            print(f"{size}px beit-jax {name}: compiled in {time.perf_counter() - t0:.1f}s", flush=True)
            subjects[f"beit-jax jit {name}"] = lambda fn=fn, v=variables, xj=xj: fn(v, xj).block_until_ready()
        times = {k: [] for k in subjects}
        for r in range(args.rounds):
            for k, f in subjects.items():
                times[k].append(timed(f, args.target_seconds))
                print(f"{size}px round {r} {k}: {args.batch / times[k][-1]:.3f} img/s", flush=True)
        base = args.batch / statistics.median(times["transformers eager float32"])
        for k, ts in times.items():
            ips = args.batch / statistics.median(ts)
            rows.append(dict(size=size, batch=args.batch, subject=k, img_per_s=ips, vs_transformers=ips / base))
    args.out.mkdir(parents=True, exist_ok=True)
    meta = dict(machine=_cpu_name(), cpus=os.cpu_count(), jax=jax.__version__, torch=torch.__version__,
                date=time.strftime("%Y-%m-%d"), command="benchmarks/bench_segmentation.py " + " ".join(sys.argv[1:]))
    (args.out / "segmentation.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    md = [f"Machine: {meta['machine']}; {meta['cpus']} CPUs; jax {meta['jax']}, torch {meta['torch']}; {meta['date']}.",
          "", f"Command: `{meta['command']}` (BEiT-B + UPerNet, ADE20K's 150 classes, random weights; "
              f"median of {args.rounds} interleaved rounds)", "",
          "| size | batch | implementation | img/s | x transformers |", "|---|---|---|---|---|"]
    md += [f"| {r['size']} | {r['batch']} | {r['subject']} | {r['img_per_s']:.3f} | {r['vs_transformers']:.2f} |"
           for r in rows]
    (args.out / "segmentation.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
