"""transformers' FlaxBeit as a benchmark peer, run in its own venv (transformers 4.x pins an older
huggingface_hub, so it never enters beit-jax's environment). Line protocol on stdin/stdout:

    load ARCH DTYPE BATCH   -> {"compile_s": ...}          (build, jit, first call)
    run ITERS               -> {"seconds": [...]}           (one timing per iteration)
    rss                     -> {"max_rss_mb": ...}
"""
import json
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from transformers import BeitConfig, FlaxBeitForImageClassification

SIZES = {"base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                      layer_scale_init_value=0.1),
         "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                       layer_scale_init_value=1e-5)}

state = {}
for line in sys.stdin:
    cmd = line.split()
    if not cmd:
        continue
    if cmd[0] == "load":
        size, dtype, batch = cmd[1], cmd[2], int(cmd[3])
        cfg = BeitConfig(use_relative_position_bias=True, use_absolute_position_embeddings=False,
                         use_mean_pooling=True, num_labels=1000, **SIZES[size])
        model = FlaxBeitForImageClassification(cfg, seed=0, dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
        fwd = jax.jit(lambda p, x: model(pixel_values=x, params=p).logits)
        x = jnp.asarray(np.random.RandomState(0).randn(batch, 3, 224, 224).astype(np.float32))
        t = time.perf_counter()
        fwd(model.params, x).block_until_ready()
        state.update(fwd=fwd, params=model.params, x=x)
        print(json.dumps({"compile_s": time.perf_counter() - t}), flush=True)
    elif cmd[0] == "run":
        times = []
        for _ in range(int(cmd[1])):
            t = time.perf_counter()
            state["fwd"](state["params"], state["x"]).block_until_ready()
            times.append(time.perf_counter() - t)
        print(json.dumps({"seconds": times}), flush=True)
    elif cmd[0] == "rss":
        print(json.dumps({"max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)
