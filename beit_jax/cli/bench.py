"""`beit-jax bench`: forward throughput of a model on this machine's devices."""
from __future__ import annotations

from .options import add_dtype_option, positive_int, to_cli


def register(sub) -> None:
    from ..layers import ATTN_IMPLS

    p = sub.add_parser("bench", help="model forward throughput on this machine's devices",
                       description="Time the jitted forward (random weights, synthetic input) on all local "
                                   "devices: compile time, images/s, achieved GFLOP/s, and which attention and "
                                   "micro-batching ran. For peer comparisons see benchmarks/ in the repository.")
    p.add_argument("--model", default="beit_base_patch16_224")
    p.add_argument("--batch-size", type=positive_int, nargs="+", default=None,
                   help="global batch sizes (default: 1 8 32 on CPU; 64 256 1024 per device on GPU/TPU)")
    add_dtype_option(p, machine_default=True)
    p.add_argument("--attn-impl", choices=ATTN_IMPLS, default="auto",
                   help="attention: auto (cuDNN on an NVIDIA GPU when it can run, else XLA), xla, cudnn (warns "
                        "and runs XLA where it cannot), dot_product_attention (jax.nn's XLA path) "
                        "(default: %(default)s)")
    p.add_argument("--seconds", type=float, default=5.0, help="time to measure per batch size")
    p.set_defaults(run=run)


def run(args) -> int:
    import time

    import jax
    import numpy as np

    from .. import parallel
    from ..factory import create_model
    from ..models import cast_for_inference
    from .options import attention_line, dtype_of

    defaults = parallel.inference_defaults(args.dtype)
    batches = args.batch_size or ([b * defaults.num_devices for b in (64, 256, 1024)] if defaults.accelerator
                                  else [1, 8, 32])
    model, variables = create_model(args.model, dtype=dtype_of(defaults.dtype), attn_impl=args.attn_impl)
    gflop = model.gflop_per_image
    print(f"{args.model} {to_cli(defaults.dtype_note())} on {jax.device_count()} x {jax.devices()[0].device_kind}; "
          f"{gflop:.1f} GFLOP/image; {attention_line(model)}")
    dp = parallel.DataParallel("sharded")
    params = dp.replicate(cast_for_inference(model, variables))
    for batch in batches:
        hint = parallel.inference_defaults(args.dtype, batch).hint
        if hint:
            print(to_cli(hint))
        step = dp.inference_step(lambda v, x: model.apply(v, x))
        x = np.random.RandomState(0).randn(batch, model.img_size, model.img_size, 3).astype(np.float32)
        t = time.perf_counter()
        jax.block_until_ready(step(params, dp.put_batch(x)))
        compile_s = time.perf_counter() - t
        steps, t = 0, time.perf_counter()
        while time.perf_counter() - t < args.seconds or steps < 2:
            jax.block_until_ready(step(params, dp.put_batch(x)))
            steps += 1
        ips = steps * batch / (time.perf_counter() - t)
        mb = model.micro_batch_rows(batch)
        chunks = f"micro-batches of {mb}" if mb else "whole batch"
        print(f"batch {batch:4d}: {ips:8.2f} img/s  {ips * gflop:8.0f} GFLOP/s  (compile {compile_s:.1f}s, {chunks})")
    return 0
