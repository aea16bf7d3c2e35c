"""The jitted train and eval steps over `parallel.DataParallel` (mixup/cutmix pairing, erasing
noise, drop path rng), and the Trainer that places batches and state."""
from __future__ import annotations

from typing import Callable, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .. import augment
from .. import parallel as par
from ..transforms import normalize
from .optim import TrainConfig
from .state import TrainState


NO_MIX = {"lam": np.float32(1.0), "cutmix": np.bool_(False), "box": np.zeros(4, np.int32)}


def mix_arrays(lam, use_cutmix, box) -> Dict[str, np.ndarray]:
    """A batch's mixup parameters as the train step takes them: augment.Mixup.params' scalars
    ('batch' mode), or params_per_row's arrays over the global batch ('pair' / 'elem')."""
    return {"lam": np.float32(lam), "cutmix": np.bool_(use_cutmix), "box": np.asarray(box, np.int32)}


def _loss_fn(model, params, x, targets, weights, rng):
    logits = model.apply({"params": params}, x, deterministic=False, rngs={"dropout": rng}).astype(jnp.float32)
    per_example = optax.softmax_cross_entropy(logits, targets)
    denom = jnp.maximum(weights.sum(), 1.0)
    return (per_example * weights).sum() / denom, logits


def make_train_step(model, cfg: TrainConfig, mean, std) -> Callable:
    """(state, images uint8 (B,H,W,3), labels (B,), weights (B,), erase boxes (B,4), sample seeds
    (B,), mix {lam, cutmix, box}: scalars, or per row of the global batch) -> (state, metrics).
    Pure; jit it.

    On the device, over the global batch: normalize, random erasing (noise from each sample's
    seed), mixup/cutmix (row i with row B-1-i of the global batch, with the batch's or the row's
    lambda and box) and mixed smoothed targets,
    loss and update, then the EMA (only on steps where the optimizer applied an update).
    """
    num_classes = model.num_classes

    def step(state: TrainState, images, labels, weights, erase_boxes, sample_seeds, mix):
        rng, step_rng = jax.random.split(state.rng)
        step_rng = jax.random.fold_in(step_rng, state.step)
        x = normalize(images, mean, std)
        if cfg.reprob > 0:
            noise = jax.vmap(lambda s: jax.random.normal(jax.random.PRNGKey(s), x.shape[1:], jnp.float32))(sample_seeds)
            x = augment.erase(x, erase_boxes, noise, cfg.remode, jnp)
        if cfg.mixing:
            x = augment.mix_images(x, mix["lam"], mix["cutmix"], mix["box"], jnp)
            targets = augment.mixup_targets(labels, num_classes, mix["lam"], cfg.label_smoothing, jnp)
        else:
            targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), cfg.label_smoothing)
        (loss, logits), grads = jax.value_and_grad(_loss_fn, argnums=1, has_aux=True)(
            model, state.params, x, targets, weights, step_rng)
        acc = ((logits.argmax(-1) == labels) * weights).sum() / jnp.maximum(weights.sum(), 1.0)
        new = state.apply_gradients(grads=grads, rng=rng)
        if cfg.model_ema_decay is not None:
            d = cfg.model_ema_decay
            updated = state.tx.has_updated(new.opt_state) if isinstance(state.tx, optax.MultiSteps) else True
            ema = jax.tree_util.tree_map(lambda e, p: jnp.where(updated, e * d + (1.0 - d) * p, e),
                                         state.ema_params, new.params)
            new = new.replace(ema_params=ema)
        finite = jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree_util.tree_leaves(new.params)]))
        return new, {"loss": loss, "accuracy": acc, "params_finite": finite.astype(jnp.float32),
                     "samples": weights.sum()}

    return step


def make_eval_step(model, mean, std) -> Callable:
    """(params, images, labels, weights) -> summed loss, top-1 and top-5 hits and count (int32:
    exact), padded rows (weight 0) left out."""

    def step(params, images, labels, weights):
        logits = model.apply({"params": params}, normalize(images, mean, std)).astype(jnp.float32)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        k = min(5, logits.shape[-1])
        topk = jax.lax.top_k(logits, k)[1]
        valid = weights > 0
        top1 = (topk[:, 0] == labels) & valid
        top5 = (topk == labels[:, None]).any(-1) & valid
        return {"loss": (loss * weights).sum(), "top1": top1.sum(dtype=jnp.int32),
                "top5": top5.sum(dtype=jnp.int32), "count": valid.sum(dtype=jnp.int32)}

    return step


class Trainer:
    """The train and eval steps on every device of every process, over `parallel.DataParallel`'s
    mesh: state replicated, each global batch split along the data axis (this process feeds
    rows `dp.process_rows(global_batch)`)."""

    def __init__(self, model, cfg: TrainConfig, mean, std, dp: Optional[par.DataParallel] = None):
        self.dp = dp or par.DataParallel("sharded")
        self.train_step = self.dp.train_step(make_train_step(model, cfg, mean, std), num_batch_args=5,
                                             num_replicated_args=1)
        self.eval_step = self.dp.reduce_step(make_eval_step(model, mean, std), num_batch_args=3)

    def put_state(self, state: TrainState) -> TrainState:
        return self.dp.replicate(state)

    def put(self, *arrays):
        return self.dp.put_batch(*arrays)

    def step(self, state: TrainState, images, labels, weights, erase_boxes=None, sample_seeds=None, mix=None):
        """One train step on this process's rows of the global batch (no erasing/mixing unless given)."""
        n = len(labels)
        erase_boxes = np.zeros((n, 4), np.int32) if erase_boxes is None else np.asarray(erase_boxes, np.int32)
        sample_seeds = np.zeros((n,), np.int32) if sample_seeds is None else np.asarray(sample_seeds, np.int32)
        batch = self.put(np.asarray(images), np.asarray(labels, np.int32), np.asarray(weights, np.float32),
                         erase_boxes, sample_seeds)
        return self.train_step(state, *batch, self.dp.replicate(NO_MIX if mix is None else mix))
