"""One benchmark subject in its own process (so peak memory is its own). Line protocol:

    load IMPL ARCH DTYPE BATCH  -> {"compile_s": ...}   IMPL: beit-jax | beit-jax-plain | timm-eager |
                                                         timm-compile | matmul
    run ITERS                   -> {"seconds": [...]}   (matmul: [{shape: GFLOP/s}, ...])
    rss                         -> {"max_rss_mb": ...}
"""
import json
import os
import resource
import sys
import time

import numpy as np

ARCH = {"base": "beit_base_patch16_224", "large": "beit_large_patch16_224"}
MATMUL_N = 2048


def load_beit_jax(arch, dtype, batch, micro_batch=True):
    import jax
    import jax.numpy as jnp

    import beit_jax
    from beit_jax.model import cast_for_inference, chunked, default_micro_batch

    model, variables = beit_jax.create_model(ARCH[arch], dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
    variables = cast_for_inference(model, variables)  # bf16: weights cast once, not per call
    fn = chunked(model.apply, default_micro_batch()) if micro_batch else model.apply
    fwd = jax.jit(fn)
    x = jnp.asarray(np.random.RandomState(0).randn(batch, 224, 224, 3).astype(np.float32))
    return lambda: fwd(variables, x).block_until_ready()


def load_timm(arch, dtype, batch, compile_):
    import torch
    import timm

    torch.set_num_threads(os.cpu_count())
    model = timm.create_model(ARCH[arch]).eval()
    if compile_:
        model = torch.compile(model)
    x = torch.from_numpy(np.random.RandomState(0).randn(batch, 3, 224, 224).astype(np.float32))

    def step():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            return model(x)

    return step


MATMUL_SHAPES = [(2048, 2048, 2048), (1576, 768, 3072), (1576, 3072, 768)]  # square + BEiT-B MLP at b8


def load_matmul(dtype):
    """This machine's matmul peak: products of several shapes in XLA and in torch, fp32 or bf16
    (bf16 with fp32 accumulation, as beit-jax runs it). Returns {name: (fn, flop)}."""
    import jax
    import jax.numpy as jnp
    import torch

    torch.set_num_threads(os.cpu_count())
    jdt = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    tdt = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    f = jax.jit(lambda a, b: jax.lax.dot(a, b, preferred_element_type=jnp.float32))
    out = {}
    rng = np.random.RandomState(0)
    for m, k, n in MATMUL_SHAPES:
        a = rng.randn(m, k).astype(np.float32)
        b = rng.randn(k, n).astype(np.float32)
        ja, jb = jnp.asarray(a, jdt), jnp.asarray(b, jdt)
        ta, tb = torch.from_numpy(a).to(tdt), torch.from_numpy(b).to(tdt)
        flop = 2 * m * k * n
        out[f"xla {m}x{k}x{n}"] = ((lambda ja=ja, jb=jb: f(ja, jb).block_until_ready()), flop)
        out[f"torch {m}x{k}x{n}"] = ((lambda ta=ta, tb=tb: ta @ tb), flop)
    return out


state = {}
for line in sys.stdin:
    cmd = line.split()
    if not cmd:
        continue
    if cmd[0] == "load":
        impl, arch, dtype, batch = cmd[1], cmd[2], cmd[3], int(cmd[4])
        t = time.perf_counter()
        if impl == "matmul":
            fns = load_matmul(dtype)
            for f, _ in fns.values():
                f()
            state["step"] = fns
        else:
            step = {"beit-jax": lambda: load_beit_jax(arch, dtype, batch),
                    "beit-jax-plain": lambda: load_beit_jax(arch, dtype, batch, micro_batch=False),
                    "timm-eager": lambda: load_timm(arch, dtype, batch, False),
                    "timm-compile": lambda: load_timm(arch, dtype, batch, True)}[impl]()
            t = time.perf_counter()  # compile/first call only, not model construction
            step()
            state["step"] = step
        print(json.dumps({"compile_s": time.perf_counter() - t}), flush=True)
    elif cmd[0] == "run":
        step = state["step"]
        if isinstance(step, dict):  # matmul: GFLOP/s of every shape and library, per iteration
            rates = []
            for _ in range(int(cmd[1])):
                r = {}
                for name, (f, flop) in step.items():
                    t = time.perf_counter()
                    f()
                    r[name] = flop / (time.perf_counter() - t) / 1e9
                rates.append(r)
            print(json.dumps({"seconds": rates}), flush=True)
            continue
        times = []
        for _ in range(int(cmd[1])):
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
        print(json.dumps({"seconds": times}), flush=True)
    elif cmd[0] == "rss":
        print(json.dumps({"max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)
