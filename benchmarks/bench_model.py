"""Model forward throughput: beit-jax vs timm eager, timm torch.compile and transformers' FlaxBeit.

    .venv/bin/python benchmarks/bench_model.py                 # CPU: base 1/8/32 + large 8 (~30 min on 2 cores)
    .venv/bin/python benchmarks/bench_model.py --quick         # base at batch 8 only
    .venv/bin/python benchmarks/bench_model.py --groups base:32 --baseline /path/to/old/checkout
    .venv/bin/python benchmarks/bench_model.py --device gpu    # CUDA: base/large at 64/256/1024, MFU, parity,
                                                               # then bench_pipeline.py --device gpu

beit-jax runs as README says, `jax.jit(model.apply)` (the model micro-batches on CPU and picks its
attention itself); "whole batch" rows turn the micro-batching off (`micro_batch=None`), which is
what `jax.jit(model.apply)` ran before the model did it by itself. --baseline DIR adds a subject
running DIR's beit_jax (e.g. `git archive main | tar -x -C DIR`) the same way: before vs after in
one run.

Every subject runs in its own worker process (its peak RSS is its own) and all subjects of one
(arch, batch) group take turns, round after round, so machine noise hits them alike and the
ratios are comparable. The matmul peak (XLA and torch, fp32 and bf16, several shapes) is measured
in the same rotation. On GPU, timm runs AMP (bf16 autocast, channels_last, torch.compile) and
TF32 for fp32, like JAX's default precision; MFU divides by the card's nominal dense peak
(PEAK_TFLOPS) and parity is checked with `jax.default_matmul_precision("float32")`.
FlaxBeit (CPU only) needs its own venv (transformers 4.x downgrades huggingface_hub):
    python3 -m venv benchmarks/.venv-flaxbeit
    benchmarks/.venv-flaxbeit/bin/pip install "transformers<5" jax flax
Writes benchmarks/results/model[-gpu].json and .md.
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

# Nominal dense peaks in TFLOP/s (vendor datasheets, no sparsity): (bf16, tf32), matched on device_kind.
PEAK_TFLOPS = [("H200", 989.4, 494.7), ("H100 PCIe", 756.0, 378.0), ("H100 NVL", 835.0, 417.5),
               ("H100", 989.4, 494.7), ("A100", 312.0, 156.0), ("L40S", 362.1, 181.0), ("L4", 121.0, 60.0)]


def nominal_peak(device_kind: str, dtype: str):
    """The card's nominal dense peak (GFLOP/s) for bf16 or TF32 (fp32 rows), or None if unknown."""
    for name, bf16, tf32 in PEAK_TFLOPS:
        if name.lower() in device_kind.lower():
            return 1e3 * (bf16 if dtype == "bfloat16" else tf32)
    return None


def model_gflop(arch: str) -> float:
    """Forward GFLOP per 224x224 image (`Beit.gflop_per_image`: every matmul, attention included)."""
    import beit_jax

    return beit_jax.build_model(ARCH[arch]).gflop_per_image


class Worker:
    def __init__(self, label, impl, arch, dtype, batch, options="", python=sys.executable, script=HERE / "_worker.py",
                 pythonpath=ROOT):
        self.label, self.impl, self.arch, self.dtype, self.batch = label, impl, arch, dtype, batch
        self.options = options
        self.pythonpath = Path(pythonpath).resolve()
        # GPU: several JAX workers share the card, so none may preallocate most of its memory.
        env = dict(os.environ, PYTHONPATH=str(pythonpath), XLA_PYTHON_CLIENT_PREALLOCATE="false")
        self.proc = subprocess.Popen([str(python), str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, env=env, cwd=ROOT)
        self.times, self.compile_s, self.rss_mb, self.iters, self.info, self.error = [], None, None, 1, {}, None

    def ask(self, line):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        out = self.proc.stdout.readline()
        if not out:
            raise RuntimeError(f"{self.label} {self.dtype}: worker died on {line!r}")
        return json.loads(out)

    def load(self):
        if self.impl == "flaxbeit":
            self.info = self.ask(f"load {self.arch} {self.dtype} {self.batch}")
        else:
            self.info = self.ask(f"load {self.impl} {self.arch} {self.dtype} {self.batch} {self.options}".strip())
        self.compile_s = self.info.pop("compile_s")

    def close(self):
        try:
            if self.proc.poll() is None:
                self.rss_mb = self.ask("rss")["max_rss_mb"]
        finally:
            if self.proc.stdin:
                self.proc.stdin.close()
            self.proc.wait(timeout=60)


def subjects(arch, batch, args):
    """(label, impl, dtype, worker options, python, pythonpath) of one group, in rotation order."""
    if args.device == "gpu":
        for dtype in ("bfloat16", "float32"):
            yield "matmul peak", "matmul", dtype, "device=gpu", None, None
            attns = ("auto", "xla") if dtype == "bfloat16" else ("auto",)
            for attn in attns:
                yield f"beit-jax (attn {attn})", "beit-jax", dtype, f"device=gpu attn={attn}", None, None
            yield "timm AMP torch.compile" if dtype == "bfloat16" else "timm TF32 torch.compile", "timm-compile", \
                dtype, "device=gpu", None, None
            yield "timm AMP eager" if dtype == "bfloat16" else "timm TF32 eager", "timm-eager", dtype, "device=gpu", \
                None, None
        return
    for dtype in args.dtypes:
        yield "matmul peak", "matmul", dtype, "", None, None
        yield "beit-jax", "beit-jax", dtype, "", None, None
        if batch > 8 and dtype == "float32":
            yield "beit-jax (whole batch)", "beit-jax", dtype, "micro=none", None, None
        if args.baseline and dtype == "float32":
            yield "beit-jax @baseline", "beit-jax", dtype, "attn=default micro=default", None, args.baseline
        yield "timm eager", "timm-eager", dtype, "", None, None
        if not args.skip_compile and (arch == "base" or dtype == "float32"):
            yield "timm torch.compile", "timm-compile", dtype, "", None, None
        if not args.skip_flaxbeit:
            yield "transformers FlaxBeit", "flaxbeit", dtype, "", args.flaxbeit_python, None


def run_group(arch, batch, rounds, target_s, args, log):
    workers = []
    for label, impl, dtype, options, python, pythonpath in subjects(arch, batch, args):
        kw = dict(python=python, script=HERE / "_flaxbeit_worker.py") if impl == "flaxbeit" else {}
        w = Worker(label, impl, arch, dtype, batch, options, pythonpath=pythonpath or ROOT, **kw)
        log(f"  loading {label} {dtype} ...")
        try:
            w.load()
            t = time.perf_counter()
            w.ask("run 1")
            w.iters = max(1, round(target_s / max(time.perf_counter() - t, 1e-3)))
        except (RuntimeError, ValueError) as e:  # e.g. out of memory at batch 1024: reported, not fatal
            w.error = str(e)
            log(f"  {label} {dtype} failed: {e}")
            w.close()
            continue
        workers.append(w)
    for r in range(rounds):
        order = workers[r % len(workers):] + workers[: r % len(workers)]
        for w in order:
            if w.error is None:
                try:
                    w.times.extend(w.ask(f"run {w.iters}")["seconds"])
                except RuntimeError as e:
                    w.error = str(e)
        log(f"  round {r + 1}/{rounds} done")
    for w in workers:
        try:
            w.close()
        except (RuntimeError, ValueError):
            pass
    return [w for w in workers if w.error is None and w.times]


def summarize(arch, batch, workers, device_kind=None):
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
        best_peak = max(peak[w.dtype].values()) if w.dtype in peak else None
        nominal = nominal_peak(device_kind, w.dtype) if device_kind else None
        rows.append(dict(arch=arch, batch=batch, impl=w.label, dtype=w.dtype, img_per_s=ips,
                         gflop_per_s=ips * gflop, peak_fraction=ips * gflop / best_peak if best_peak else None,
                         mfu=ips * gflop / nominal if nominal else None, compile_s=w.compile_s,
                         peak_rss_mb=w.rss_mb, samples=len(w.times), **w.info))
        assert w.info.get("source") in (None, str(w.pythonpath / "beit_jax")), (w.label, w.info)  # ran what it says
    for dtype in ("float32", "bfloat16"):
        peers = [r["img_per_s"] for r in rows if r["dtype"] == dtype and not r["impl"].startswith("beit-jax")]
        for r in rows:
            if r["dtype"] == dtype:
                r["vs_best_peer"] = r["img_per_s"] / max(peers) if peers else None
    return dict(arch=arch, batch=batch, gflop_per_image=gflop, matmul_peak_gflops=peak, rows=rows)


def markdown(groups, meta):
    gpu = meta.get("device") == "gpu"
    lines = [f"Machine: {meta['machine']}; {meta['cpus']} CPUs; jax {meta['jax']}, torch {meta['torch']}, "
             f"timm {meta['timm']}; {meta['date']}.", "", f"Command: `{meta['command']}`", "",
             "| model | batch | dtype | implementation | img/s | x best peer | GFLOP/s | % of matmul peak | "
             + ("MFU | " if gpu else "") + "attention | micro-batch | compile s | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|" + ("---|" if gpu else "") + "---|---|---|---|"]
    for g in groups:
        for r in sorted(g["rows"], key=lambda r: (r["dtype"] != "float32", -r["img_per_s"])):
            vs = f"{r['vs_best_peer']:.2f}" if r.get("vs_best_peer") else "-"
            pf = f"{100 * r['peak_fraction']:.0f}%" if r.get("peak_fraction") else "-"
            mfu = (f"{100 * r['mfu']:.0f}% | " if r.get("mfu") else "- | ") if gpu else ""
            mb = r.get("micro_batch")
            mb = "-" if "micro_batch" not in r else (str(mb) if mb else "whole")
            rss = f"{r['peak_rss_mb']:.0f}" if r.get("peak_rss_mb") else "-"
            lines.append(f"| {g['arch']} | {g['batch']} | {r['dtype']} | {r['impl']} | {r['img_per_s']:.2f} | {vs} | "
                         f"{r['gflop_per_s']:.0f} | {pf} | {mfu}{r.get('attention', '-')} | {mb} | "
                         f"{r['compile_s']:.1f} | {rss} |")
    lines.append("")
    lines.append("Matmul peak (best of the square and BEiT-B MLP shapes, median over the rotation; "
                 "% of peak uses the same dtype's best library):")
    for g in groups:
        lines.append(f"- {g['arch']} batch {g['batch']}: " + "; ".join(
            f"{dt} XLA {p['xla']:.0f} / torch {p['torch']:.0f} GFLOP/s" for dt, p in g["matmul_peak_gflops"].items()))
    if meta.get("parity"):
        lines.append("")
        parity = "; ".join(f"{a} max|dlogits| {d:.2e}" for a, d in meta["parity"].items())
        lines.append("Parity on this device (fp32, `jax.default_matmul_precision('float32')` vs timm fp32 without "
                     f"TF32, random weights): {parity}")
    return "\n".join(lines) + "\n"


def gpu_parity(archs, log):
    w = Worker("parity", "parity", None, None, None)
    out = {}
    try:
        for arch in archs:
            log(f"parity {arch} ...")
            out[arch] = w.ask(f"parity {arch} 8 gpu")["max_abs_logits"]
    finally:
        w.close()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--quick", action="store_true", help="base at batch 8 (CPU) / 256 (GPU) only")
    ap.add_argument("--groups", help="comma list of arch:batch, e.g. base:1,base:8,base:32")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtypes", type=lambda t: [d for d in t.split(",") if d], default=["float32", "bfloat16"],
                    help="CPU: which compute dtypes to run (default: float32,bfloat16)")
    ap.add_argument("--target-seconds", type=float, default=3.0, help="time per subject per round")
    ap.add_argument("--skip-compile", action="store_true", help="leave out timm torch.compile")
    ap.add_argument("--baseline", type=Path, help="another checkout's root: its beit_jax runs as 'beit-jax @baseline'")
    ap.add_argument("--skip-pipeline", action="store_true", help="GPU: do not run bench_pipeline.py --device gpu after")
    ap.add_argument("--flaxbeit-python", default=str(FLAXBEIT_PY))
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()
    args.skip_flaxbeit = args.device == "gpu" or not Path(args.flaxbeit_python).exists()
    if args.device == "cpu" and args.skip_flaxbeit:
        print(f"note: {args.flaxbeit_python} not found, FlaxBeit left out (see the docstring)", file=sys.stderr)
    if args.groups:
        groups_spec = [(g.split(":")[0], int(g.split(":")[1])) for g in args.groups.split(",")]
    elif args.device == "gpu":
        groups_spec = [("base", 256)] if args.quick else [(a, b) for a in ("base", "large") for b in (64, 256, 1024)]
    else:
        groups_spec = [("base", 8)] if args.quick else [("base", 1), ("base", 8), ("base", 32), ("large", 8)]
    import jax
    import timm
    import torch

    device_kind = None
    if args.device == "gpu":
        if not torch.cuda.is_available():
            sys.exit("--device gpu: torch sees no CUDA device")
        device_kind = torch.cuda.get_device_name(0)
    meta = dict(machine=_cpu_name() + (f", {device_kind}" if device_kind else ""), cpu=_cpu_info(),
                cpus=os.cpu_count(), device=args.device, device_kind=device_kind,
                jax=jax.__version__, torch=torch.__version__, timm=timm.__version__,
                date=time.strftime("%Y-%m-%d"), command=" ".join(["benchmarks/bench_model.py"] + sys.argv[1:]))
    log = lambda m: print(m, flush=True)  # noqa: E731
    if args.device == "gpu":
        meta["parity"] = gpu_parity(sorted({a for a, _ in groups_spec}), log)
    groups = []
    for arch, batch in groups_spec:
        log(f"{arch} batch {batch}")
        workers = run_group(arch, batch, args.rounds, args.target_seconds, args, log)
        groups.append(summarize(arch, batch, workers, device_kind))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "model-gpu" if args.device == "gpu" else "model"
    (args.out / f"{stem}.json").write_text(json.dumps(dict(meta=meta, groups=groups), indent=2))
    md = markdown(groups, meta)
    (args.out / f"{stem}.md").write_text(md)
    print(md)
    if args.device == "gpu" and not args.skip_pipeline:
        subprocess.run([sys.executable, str(HERE / "bench_pipeline.py"), "--device", "gpu", "--out", str(args.out)],
                       check=False)


def _cpu_info() -> dict:
    """The CPU's vendor, family/model numbers, name and the ISA flags that matter for matmuls."""
    info = {"vendor": platform.machine(), "name": platform.processor() or platform.machine()}
    try:
        with open("/proc/cpuinfo") as f:
            fields = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines() if ":" in line)
    except OSError:
        return info
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = fields.get("flags", "").split()
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16", "amx_bf16", "amx_tile", "amx_int8")
    return {"vendor": fields.get("vendor_id", info["vendor"]), "name": fields.get("model name", info["name"]),
            "family": fields.get("cpu family"), "model": fields.get("model"),
            "isa": [f for f in wanted if f in flags]}


def _cpu_name() -> str:
    """One line: name, vendor, family/model, ISA flags (every table says which CPU it ran on)."""
    c = _cpu_info()
    fam = f", family {c['family']} model {c['model']}" if c.get("family") else ""
    isa = f"; {' '.join(c['isa'])}" if c.get("isa") else ""
    return f"{c['name']} ({c['vendor']}{fam}{isa})"


if __name__ == "__main__":
    main()
