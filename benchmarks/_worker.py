"""One benchmark subject in its own process (so peak memory is its own). Line protocol:

    load IMPL ARCH DTYPE BATCH  -> {"compile_s": ...}   IMPL: beit-jax | beit-jax-plain | timm-eager |
                                                         timm-compile | matmul
    run ITERS                   -> {"seconds": [...]}
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
    from beit_jax.model import chunked, default_micro_batch

    model, variables = beit_jax.create_model(ARCH[arch], dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
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


def load_matmul(dtype):
    """The machine's matmul peak for this process: a 2048^3 fp32 product in XLA and in torch."""
    import jax
    import jax.numpy as jnp
    import torch

    torch.set_num_threads(os.cpu_count())
    a = jnp.asarray(np.random.RandomState(0).randn(MATMUL_N, MATMUL_N).astype(np.float32))
    f = jax.jit(jnp.dot)
    ta = torch.from_numpy(np.asarray(a))
    which = {"xla": lambda: f(a, a).block_until_ready(), "torch": lambda: ta @ ta}
    return which


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
            for f in fns.values():
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
        if isinstance(step, dict):  # matmul: best of both libraries, per iteration
            times = []
            for _ in range(int(cmd[1])):
                best = {}
                for name, f in step.items():
                    t = time.perf_counter()
                    f()
                    best[name] = time.perf_counter() - t
                times.append(best)
            print(json.dumps({"seconds": times}), flush=True)
            continue
        times = []
        for _ in range(int(cmd[1])):
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
        print(json.dumps({"seconds": times}), flush=True)
    elif cmd[0] == "rss":
        print(json.dumps({"max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)
