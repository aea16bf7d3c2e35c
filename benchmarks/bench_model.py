"""Model forward throughput: beit-jax vs timm eager, timm torch.compile and transformers' FlaxBeit.

    .venv/bin/python benchmarks/bench_model.py                 # everything (about 30 min on 2 cores)
    .venv/bin/python benchmarks/bench_model.py --quick         # base at batch 8 only

Every subject runs in its own worker process (its peak RSS is its own) and all subjects of one
(arch, batch) group take turns, round after round, so machine noise hits them alike and the
ratios are comparable. The matmul peak (XLA and torch, fp32 and bf16, several shapes) is measured
in the same rotation. FlaxBeit needs its own venv (transformers 4.x downgrades huggingface_hub):
    python3 -m venv benchmarks/.venv-flaxbeit
    benchmarks/.venv-flaxbeit/bin/pip install "transformers<5" jax flax
Writes benchmarks/results/model.json and model.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FLAXBEIT_PY = HERE / ".venv-flaxbeit" / "bin" / "python"
ARCH = {"base": "beit_base_patch16_224", "large": "beit_large_patch16_224"}
sys.path.insert(0, str(ROOT))


def model_gflop(arch: str) -> float:
    """Forward GFLOP per 224x224 image (`Beit.gflop_per_image`: every matmul, attention included)."""
    import beit_jax

    return beit_jax.build_model(ARCH[arch]).gflop_per_image


class Worker:
    def __init__(self, label, impl, arch, dtype, batch, python=sys.executable, script=HERE / "_worker.py"):
        self.label, self.impl, self.arch, self.dtype, self.batch = label, impl, arch, dtype, batch
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen([str(python), str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, env=env, cwd=ROOT)
        self.times, self.compile_s, self.rss_mb, self.iters = [], None, None, 1

    def ask(self, line):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        out = self.proc.stdout.readline()
        if not out:
            raise RuntimeError(f"{self.label}: worker died on {line!r}")
        return json.loads(out)

    def load(self):
        if self.impl == "flaxbeit":
            self.compile_s = self.ask(f"load {self.arch} {self.dtype} {self.batch}")["compile_s"]
        else:
            self.compile_s = self.ask(f"load {self.impl} {self.arch} {self.dtype} {self.batch}")["compile_s"]

    def close(self):
        try:
            self.rss_mb = self.ask("rss")["max_rss_mb"]
        finally:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def subjects(arch, batch, skip_compile, skip_flaxbeit):
    for dtype in ("float32", "bfloat16"):
        yield "matmul peak", "matmul", dtype
        yield "beit-jax", "beit-jax", dtype
        if batch > 8 and dtype == "float32":
            yield "beit-jax (no micro-batching)", "beit-jax-plain", dtype
        yield "timm eager", "timm-eager", dtype
        if not skip_compile and (arch == "base" or dtype == "float32"):
            yield "timm torch.compile", "timm-compile", dtype
        if not skip_flaxbeit:
            yield "transformers FlaxBeit", "flaxbeit", dtype


def run_group(arch, batch, rounds, target_s, args, log):
    workers = []
    for label, impl, dtype in subjects(arch, batch, args.skip_compile, args.skip_flaxbeit):
        kw = dict(python=args.flaxbeit_python, script=HERE / "_flaxbeit_worker.py") if impl == "flaxbeit" else {}
        w = Worker(label, impl, arch, dtype, batch, **kw)
        log(f"  loading {label} {dtype} ...")
        w.load()
        t = time.perf_counter()
        w.ask("run 1")
        w.iters = max(1, round(target_s / max(time.perf_counter() - t, 1e-3)))
        workers.append(w)
    for r in range(rounds):
        order = workers[r % len(workers):] + workers[: r % len(workers)]
        for w in order:
            w.times.extend(w.ask(f"run {w.iters}")["seconds"])
        log(f"  round {r + 1}/{rounds} done")
    for w in workers:
        w.close()
    return workers


def summarize(arch, batch, workers):
    gflop = model_gflop(arch)
    peak = {}  # dtype -> {"xla"/"torch": best over shapes of the median GFLOP/s}
    for mm in (w for w in workers if w.impl == "matmul"):
        med = {k: statistics.median(r[k] for r in mm.times) for k in mm.times[0]}
        peak[mm.dtype] = {lib: max(v for k, v in med.items() if k.startswith(lib)) for lib in ("xla", "torch")}
    rows = []
    for w in workers:
        if w.impl == "matmul":
            continue
        ips = batch / statistics.median(w.times)
        best_peak = max(peak[w.dtype].values())
        rows.append(dict(arch=arch, batch=batch, impl=w.label, dtype=w.dtype, img_per_s=ips,
                         gflop_per_s=ips * gflop, peak_fraction=ips * gflop / best_peak,
                         compile_s=w.compile_s, peak_rss_mb=w.rss_mb, samples=len(w.times)))
    for dtype in ("float32", "bfloat16"):
        peers = [r["img_per_s"] for r in rows if r["dtype"] == dtype and not r["impl"].startswith("beit-jax")]
        for r in rows:
            if r["dtype"] == dtype:
                r["vs_best_peer"] = r["img_per_s"] / max(peers) if peers else None
    return dict(arch=arch, batch=batch, gflop_per_image=gflop, matmul_peak_gflops=peak, rows=rows)


def markdown(groups, meta):
    lines = [f"Machine: {meta['machine']}; {meta['cpus']} CPUs; jax {meta['jax']}, torch {meta['torch']}, "
             f"timm {meta['timm']}; {meta['date']}.", "",
             "| model | batch | dtype | implementation | img/s | x best peer | GFLOP/s | % of matmul peak | "
             "compile s | peak RSS MB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for g in groups:
        for r in sorted(g["rows"], key=lambda r: (r["dtype"] != "float32", -r["img_per_s"])):
            vs = f"{r['vs_best_peer']:.2f}" if r.get("vs_best_peer") else "-"
            lines.append(f"| {g['arch']} | {g['batch']} | {r['dtype']} | {r['impl']} | {r['img_per_s']:.2f} | {vs} | "
                         f"{r['gflop_per_s']:.0f} | {100 * r['peak_fraction']:.0f}% | {r['compile_s']:.1f} | "
                         f"{r['peak_rss_mb']:.0f} |")
    lines.append("")
    lines.append("Matmul peak (best of 2048^3 and BEiT-B MLP shapes, median over the rotation; "
                 "% of peak uses the same dtype's best library):")
    for g in groups:
        lines.append(f"- {g['arch']} batch {g['batch']}: " + "; ".join(
            f"{dt} XLA {p['xla']:.0f} / torch {p['torch']:.0f} GFLOP/s" for dt, p in g["matmul_peak_gflops"].items()))
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="base at batch 8 only")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--target-seconds", type=float, default=3.0, help="time per subject per round")
    ap.add_argument("--skip-compile", action="store_true", help="leave out timm torch.compile")
    ap.add_argument("--flaxbeit-python", default=str(FLAXBEIT_PY))
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()
    args.skip_flaxbeit = not Path(args.flaxbeit_python).exists()
    if args.skip_flaxbeit:
        print(f"note: {args.flaxbeit_python} not found, FlaxBeit left out (see the docstring)", file=sys.stderr)
    groups_spec = [("base", 8)] if args.quick else [("base", 1), ("base", 8), ("base", 32), ("large", 8)]
    import jax
    import timm
    import torch

    meta = dict(machine=f"{platform.processor() or platform.machine()} ({_cpu_name()})", cpus=os.cpu_count(),
                jax=jax.__version__, torch=torch.__version__, timm=timm.__version__,
                date=time.strftime("%Y-%m-%d"), command=" ".join(sys.argv))
    groups = []
    for arch, batch in groups_spec:
        print(f"{arch} batch {batch}", flush=True)
        workers = run_group(arch, batch, args.rounds, args.target_seconds, args, lambda m: print(m, flush=True))
        groups.append(summarize(arch, batch, workers))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "model.json").write_text(json.dumps(dict(meta=meta, groups=groups), indent=2))
    md = markdown(groups, meta)
    (args.out / "model.md").write_text(md)
    print(md)


def _cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


if __name__ == "__main__":
    main()
