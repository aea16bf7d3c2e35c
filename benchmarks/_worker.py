"""One benchmark subject in its own process (so peak memory is its own). Line protocol:

    load IMPL ARCH DTYPE BATCH [key=value ...]  -> {"compile_s": ..., ...}
         IMPL: beit-jax | timm-eager | timm-compile | matmul
         options: device=cpu|gpu; beit-jax: attn=auto|xla|cudnn|dot_product_attention, micro=auto|none
                  (micro=none: the whole batch at once, what `jax.jit(model.apply)` ran before the
                  model micro-batched by itself)
    run ITERS                   -> {"seconds": [...]}   (matmul: [{shape: GFLOP/s}, ...])
    parity ARCH BATCH           -> {"max_abs_logits": ...}  beit-jax fp32 under
                                   jax.default_matmul_precision("float32") vs timm fp32 (no TF32), same weights
    rss                         -> {"max_rss_mb": ...}

A beit-jax worker started with PYTHONPATH at another checkout (bench_model.py --baseline) times that
code instead, through the API both share (create_model, cast_for_inference, jax.jit(model.apply)).
"""
import json
import os
import resource
import sys
import time

import numpy as np

ARCH = {"base": "beit_base_patch16_224", "large": "beit_large_patch16_224"}


def load_beit_jax(arch, dtype, batch, attn="auto", micro="auto", device="cpu"):
    import jax
    import jax.numpy as jnp

    import beit_jax
    try:
        from beit_jax import cast_for_inference
    except ImportError:  # a --baseline checkout from before models/ (it lived in layers)
        from beit_jax.layers import cast_for_inference

    kwargs = {}
    if attn != "default":
        kwargs["attn_impl"] = attn
    if micro != "default":
        kwargs["micro_batch"] = None if micro == "none" else micro
    model, variables = beit_jax.create_model(ARCH[arch], dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32,
                                             **kwargs)
    variables = cast_for_inference(model, variables)  # bf16: weights cast once, not per call
    fwd = jax.jit(model.apply)  # README's call: the model picks micro-batching and attention itself
    x = jnp.asarray(np.random.RandomState(0).randn(batch, 224, 224, 3).astype(np.float32))
    info = {"source": os.path.dirname(beit_jax.__file__)}  # which checkout ran (--baseline)
    if hasattr(model, "attention_impl"):
        info["attention"] = model.attention_impl()[0]
        info["micro_batch"] = model.micro_batch_rows(batch)
    return (lambda: fwd(variables, x).block_until_ready()), info


def load_timm(arch, dtype, batch, compile_, device="cpu"):
    """timm as its users run it: CPU inference_mode (bf16: autocast); CUDA: AMP (bf16 autocast),
    channels_last, TF32 allowed for fp32 (as JAX's default precision on GPU)."""
    import torch
    import timm

    cuda = device == "gpu"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        torch.set_num_threads(os.cpu_count())
    model = timm.create_model(ARCH[arch]).eval()
    x = torch.from_numpy(np.random.RandomState(0).randn(batch, 3, 224, 224).astype(np.float32))
    if cuda:
        model = model.cuda().to(memory_format=torch.channels_last)
        x = x.cuda().to(memory_format=torch.channels_last)
    if compile_:
        model = torch.compile(model)
    kind = "cuda" if cuda else "cpu"

    def step():
        with torch.inference_mode(), torch.autocast(kind, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            out = model(x)
        if cuda:
            torch.cuda.synchronize()
        return out

    return step, {}


CPU_MATMUL_SHAPES = [(2048, 2048, 2048), (1576, 768, 3072), (1576, 3072, 768)]  # square + BEiT-B MLP at b8
GPU_MATMUL_SHAPES = [(8192, 8192, 8192), (50432, 768, 3072), (50432, 3072, 768)]  # square + BEiT-B MLP at b256


def load_matmul(dtype, device="cpu"):
    """This machine's matmul peak: products of several shapes in XLA and in torch, fp32 (TF32 on GPU)
    or bf16 (with fp32 accumulation, as beit-jax runs it). Returns {name: (fn, flop)}."""
    import jax
    import jax.numpy as jnp
    import torch

    cuda = device == "gpu"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    else:
        torch.set_num_threads(os.cpu_count())
    jdt = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    tdt = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    f = jax.jit(lambda a, b: jax.lax.dot(a, b, preferred_element_type=jnp.float32))
    out = {}
    rng = np.random.RandomState(0)
    for m, k, n in GPU_MATMUL_SHAPES if cuda else CPU_MATMUL_SHAPES:
        a = rng.randn(m, k).astype(np.float32)
        b = rng.randn(k, n).astype(np.float32)
        ja, jb = jnp.asarray(a, jdt), jnp.asarray(b, jdt)
        ta, tb = torch.from_numpy(a).to(tdt), torch.from_numpy(b).to(tdt)
        if cuda:
            ta, tb = ta.cuda(), tb.cuda()

        def torch_mm(ta=ta, tb=tb):
            r = ta @ tb
            if cuda:
                torch.cuda.synchronize()
            return r

        flop = 2 * m * k * n
        out[f"xla {m}x{k}x{n}"] = ((lambda ja=ja, jb=jb: f(ja, jb).block_until_ready()), flop)
        out[f"torch {m}x{k}x{n}"] = (torch_mm, flop)
    return out


def parity(arch, batch, device="cpu"):
    """Max |logits difference| of beit-jax fp32 (full-precision matmuls) vs timm fp32 (no TF32) on
    random timm weights converted to Flax, on one random batch."""
    import jax
    import torch
    import timm

    import beit_jax

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    tm = timm.create_model(ARCH[arch]).eval()
    with torch.no_grad():
        for p in tm.parameters():  # no zero biases / unit norms (as tests/support.perturb_ does)
            p.add_(torch.randn_like(p) * 0.02)
    sd = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
    model = beit_jax.build_model(ARCH[arch])
    variables = beit_jax.convert_timm_state_dict(sd, model)
    x = np.random.RandomState(1).randn(batch, 224, 224, 3).astype(np.float32)
    with jax.default_matmul_precision("float32"):
        ours = np.asarray(jax.jit(model.apply)(variables, x))
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    if device == "gpu":
        tm, xt = tm.cuda(), xt.cuda()
    with torch.no_grad():
        ref = tm(xt).float().cpu().numpy()
    return float(np.abs(ours - ref).max())


def main():
    state = {}
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "load":
            impl, arch, dtype, batch = cmd[1], cmd[2], cmd[3], int(cmd[4])
            opts = dict(kv.split("=", 1) for kv in cmd[5:])
            device = opts.pop("device", "cpu")
            t = time.perf_counter()
            info = {}
            if impl == "matmul":
                fns = load_matmul(dtype, device)
                for f, _ in fns.values():
                    f()
                state["step"] = fns
            else:
                step, info = {"beit-jax": lambda: load_beit_jax(arch, dtype, batch, device=device, **opts),
                              "timm-eager": lambda: load_timm(arch, dtype, batch, False, device),
                              "timm-compile": lambda: load_timm(arch, dtype, batch, True, device)}[impl]()
                t = time.perf_counter()  # compile/first call only, not model construction
                step()
                state["step"] = step
            print(json.dumps(dict(info, compile_s=time.perf_counter() - t)), flush=True)
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
        elif cmd[0] == "parity":
            device = cmd[3] if len(cmd) > 3 else "cpu"
            print(json.dumps({"max_abs_logits": parity(cmd[1], int(cmd[2]), device)}), flush=True)
        elif cmd[0] == "rss":
            print(json.dumps({"max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)


if __name__ == "__main__":
    main()
