"""A logistic-regression probe on extracted features."""
from __future__ import annotations

from typing import Any, Dict

import jax
import jax.numpy as jnp
import numpy as np
import optax



# ---- linear probe -------------------------------------------------------------------------------
def linear_probe(train_feats: np.ndarray, train_labels: np.ndarray, val_feats: np.ndarray, val_labels: np.ndarray,
                 *, l2: float = 1e-4, steps: int = 500, lr: float = 0.1, seed: int = 0) -> Dict[str, Any]:
    """Multinomial logistic regression (L2-regularised, full-batch Adam) on standardised features.

    Returns weights, bias and train/val top-1 accuracy. Fast: no image decoding, full batch.
    """
    mu, sigma = train_feats.mean(0), train_feats.std(0) + 1e-6
    xt = jnp.asarray((train_feats - mu) / sigma)
    xv = jnp.asarray((val_feats - mu) / sigma)
    yt = jnp.asarray(train_labels)
    num_classes = int(max(train_labels.max(), val_labels.max())) + 1
    params = {"w": jnp.zeros((xt.shape[1], num_classes)), "b": jnp.zeros((num_classes,))}
    tx = optax.adam(lr)
    opt = tx.init(params)

    def loss(p):
        logits = xt @ p["w"] + p["b"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, yt).mean() + l2 * jnp.sum(p["w"] ** 2)

    @jax.jit
    def step(p, o):
        l, g = jax.value_and_grad(loss)(p)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, l

    for _ in range(steps):
        params, opt, _ = step(params, opt)
    acc = lambda x, y: float(np.mean(np.asarray((x @ params["w"] + params["b"]).argmax(-1)) == y))
    return {"train_top1": acc(xt, train_labels), "val_top1": acc(xv, val_labels), "num_classes": num_classes,
            "mean": mu, "std": sigma, "weights": np.asarray(params["w"]), "bias": np.asarray(params["b"])}
