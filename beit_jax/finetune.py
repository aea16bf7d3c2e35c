"""Fine-tuning and linear probing with optax, the BEiT recipe.

AdamW with layer-wise lr decay exactly as timm's `param_groups_layer_decay` (stem = layer 0,
block i = i + 1, final norm next, head last), no weight decay on 1-D params, cls token and
position tables; warmup + cosine; label smoothing; drop path from the model's rng; optional
gradient accumulation (optax.MultiSteps); bf16 compute over fp32 master params. The train step
is data-parallel over every device (jit + NamedSharding, the same mesh as extraction).
Checkpoints (flax.serialization, atomic) hold params, optimizer state, step and rng; the data
order is a pure function of (seed, epoch), so a resumed run continues the same loss curve.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization, struct, traverse_util

from .weights import flax_path_to_timm_key

_STEM = re.compile(r"^cls_token|pos_embed|patch_embed|rel_pos_bias")  # timm Beit.group_matcher
_BLOCK = re.compile(r"^blocks\.(\d+)")
_NORM = re.compile(r"^norm")
_NO_DECAY_NAMES = ("cls_token", "pos_embed")  # + every relative_position_bias_table (timm no_weight_decay)


# ---- parameter groups ---------------------------------------------------------------------------
def _params(variables):
    return variables["params"] if "params" in variables else variables


def layer_ids(model, variables) -> Dict[Tuple[str, ...], int]:
    """Flax param path -> layer id, numbered as timm's group_parameters(group_matcher, reverse=True):
    stem 0, block i -> i + 1, the final norm with the last block, head/fc_norm last."""
    flat = traverse_util.flatten_dict(dict(_params(variables)))
    ordinals = {}
    for path in flat:
        name = flax_path_to_timm_key(path)
        if _STEM.match(name):
            ordinals[path] = (0,)
        elif m := _BLOCK.match(name):
            ordinals[path] = (1, int(m.group(1)))
        elif _NORM.match(name):
            ordinals[path] = (1, 99999)
        else:  # head, fc_norm: unmatched layers get the largest ordinal
            ordinals[path] = (math.inf,)
    # timm's MATCH_PREV_GROUP: an ordinal ending in 99999 (the final norm) joins the group before it.
    ranks, lid = {}, -1
    for o in sorted(set(ordinals.values())):
        if lid < 0 or o[-1] != 99999:
            lid += 1
        ranks[o] = lid
    return {p: ranks[o] for p, o in ordinals.items()}


def layer_lr_multipliers(model, variables, layer_decay: float = 0.65):
    """Pytree like variables['params'], one float per leaf: timm's lr_scale = decay ** (L - layer)."""
    ids = layer_ids(model, variables)
    top = max(ids.values())
    return traverse_util.unflatten_dict({p: float(layer_decay ** (top - i)) for p, i in ids.items()})


def weight_decay_mask(model, variables):
    """Pytree of bools like variables['params']: True where weight decay applies (timm's rule)."""
    flat = traverse_util.flatten_dict(dict(_params(variables)))
    mask = {}
    for path, leaf in flat.items():
        name = flax_path_to_timm_key(path)
        no_decay = (np.ndim(leaf) <= 1 or name in _NO_DECAY_NAMES
                    or name.endswith("relative_position_bias_table"))
        mask[path] = not no_decay
    return traverse_util.unflatten_dict(mask)


def scale_by_tree(multipliers) -> optax.GradientTransformation:
    """Multiply each update leaf by a fixed per-leaf float (layer-wise lr decay)."""

    def init(params):
        return optax.EmptyState()

    def update(updates, state, params=None):
        return jax.tree_util.tree_map(lambda u, m: u * jnp.asarray(m, u.dtype), updates, multipliers), state

    return optax.GradientTransformation(init, update)


@dataclasses.dataclass
class TrainConfig:
    lr: float = 5e-4  # BEiT fine-tuning base lr for batch 1024 (scale linearly for other batches)
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    layer_decay: float = 0.65
    warmup_steps: int = 100
    total_steps: int = 1000
    label_smoothing: float = 0.1
    b1: float = 0.9
    b2: float = 0.999
    grad_accum: int = 1
    clip_grad_norm: Optional[float] = None
    seed: int = 0
    crop_scale: Tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range (timm default)
    hflip: float = 0.5


def make_optimizer(model, variables, cfg: TrainConfig) -> optax.GradientTransformation:
    """AdamW(warmup+cosine) with layer-wise lr decay and timm's no-decay set."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1),
                                                  max(cfg.total_steps, cfg.warmup_steps + 1), cfg.min_lr)
    chain = []
    if cfg.clip_grad_norm:
        chain.append(optax.clip_by_global_norm(cfg.clip_grad_norm))
    chain += [
        optax.scale_by_adam(cfg.b1, cfg.b2, eps=1e-8),
        optax.add_decayed_weights(cfg.weight_decay, weight_decay_mask(model, variables)),
        scale_by_tree(layer_lr_multipliers(model, variables, cfg.layer_decay)),
        optax.scale_by_learning_rate(schedule),
    ]
    tx = optax.chain(*chain)
    if cfg.grad_accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum)
    return tx


# ---- state and steps ----------------------------------------------------------------------------
@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def create_train_state(model, variables, tx, seed: int = 0) -> TrainState:
    params = jax.tree_util.tree_map(jnp.asarray, _params(variables))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.PRNGKey(seed))


def _loss_fn(model, params, images, labels, weights, rng, num_classes, smoothing, mean, std):
    from .transforms import normalize

    x = normalize(images, mean, std)
    logits = model.apply({"params": params}, x, deterministic=False, rngs={"dropout": rng}).astype(jnp.float32)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing)
    per_example = optax.softmax_cross_entropy(logits, targets)
    denom = jnp.maximum(weights.sum(), 1.0)
    return (per_example * weights).sum() / denom, logits


def make_train_step(model, tx, cfg: TrainConfig, mean, std) -> Callable:
    """(state, images uint8 (B,H,W,3), labels (B,), weights (B,)) -> (state, metrics). Pure; jit it."""

    def step(state: TrainState, images, labels, weights):
        rng, step_rng = jax.random.split(state.rng)
        step_rng = jax.random.fold_in(step_rng, state.step)
        (loss, logits), grads = jax.value_and_grad(_loss_fn, argnums=1, has_aux=True)(
            model, state.params, images, labels, weights, step_rng, model.num_classes, cfg.label_smoothing,
            mean, std)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        acc = ((logits.argmax(-1) == labels) * weights).sum() / jnp.maximum(weights.sum(), 1.0)
        return (TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng),
                {"loss": loss, "accuracy": acc})

    return step


def make_eval_step(model, mean, std) -> Callable:
    """(params, images, labels, weights) -> summed loss, top-1 and top-5 hits, count."""
    from .transforms import normalize

    def step(params, images, labels, weights):
        logits = model.apply({"params": params}, normalize(images, mean, std)).astype(jnp.float32)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        k = min(5, logits.shape[-1])
        topk = jax.lax.top_k(logits, k)[1]
        top1 = topk[:, 0] == labels
        top5 = (topk == labels[:, None]).any(-1)
        return {"loss": (loss * weights).sum(), "top1": (top1 * weights).sum(), "top5": (top5 * weights).sum(),
                "count": weights.sum()}

    return step


class ShardedTrainer:
    """The train/eval steps on every device: params replicated, batch split along a 1-D mesh."""

    def __init__(self, model, tx, cfg: TrainConfig, mean, std):
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

        self.mesh = Mesh(np.asarray(jax.devices()), ("data",))
        self.replicated = NamedSharding(self.mesh, P())
        self.batch = NamedSharding(self.mesh, P("data"))
        self.train_step = jax.jit(make_train_step(model, tx, cfg, mean, std),
                                  in_shardings=(self.replicated, self.batch, self.batch, self.batch),
                                  out_shardings=(self.replicated, self.replicated), donate_argnums=(0,))
        self.eval_step = jax.jit(make_eval_step(model, mean, std),
                                 in_shardings=(self.replicated, self.batch, self.batch, self.batch),
                                 out_shardings=self.replicated)

    def put_state(self, state: TrainState) -> TrainState:
        return jax.device_put(state, self.replicated)

    def put(self, *arrays):
        return tuple(jax.make_array_from_process_local_data(self.batch, np.asarray(a)) for a in arrays)


# ---- checkpoints --------------------------------------------------------------------------------
def save_checkpoint(path: str, state: TrainState, extra: Optional[Dict[str, Any]] = None) -> None:
    """Atomically write the whole train state (params, optimizer, step, rng) + JSON-able extras."""
    from ._io import atomic_write

    host = jax.device_get(state)
    payload = {"state": serialization.to_state_dict(host), "extra": json.dumps(extra or {})}
    atomic_write(path, serialization.msgpack_serialize(payload))


def restore_checkpoint(path: str, template: TrainState) -> Tuple[TrainState, Dict[str, Any]]:
    with open(path, "rb") as f:
        payload = serialization.msgpack_restore(f.read())
    state = serialization.from_state_dict(jax.device_get(template), payload["state"])
    return state, json.loads(payload["extra"])


# ---- data ---------------------------------------------------------------------------------------
def epoch_order(num: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled order of an epoch: a pure function of (seed, epoch) so resumes see the same data."""
    return np.random.default_rng([seed, epoch]).permutation(num)


def train_batches(refs, labels, batch_size: int, seed: int, start_step: int, decoder, image_shape):
    """Endless (images, labels, weights, epoch) batches from global step `start_step` on.

    Drops the last partial batch of each epoch (as timm's train loader does); each sample gets
    its own augmentation seed from (seed, epoch, position).
    """
    from .data import ImageRef, batches

    steps_per_epoch = len(refs) // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(refs)} training images is less than one batch of {batch_size}")
    epoch, offset = divmod(start_step, steps_per_epoch)
    while True:
        order = epoch_order(len(refs), seed, epoch)[: steps_per_epoch * batch_size]
        order = order[offset * batch_size:]
        seeded = [dataclasses.replace(refs[i], seed=int(np.random.default_rng([seed, epoch, int(i)]).integers(2 ** 31)))
                  for i in order]
        for hb in batches(seeded, list(range(len(seeded))), batch_size, decoder, image_shape):
            idx = order[hb.indices.clip(0)]
            yield hb.images, labels[idx], hb.valid.astype(np.float32), epoch
        epoch, offset = epoch + 1, 0


def evaluate(trainer: ShardedTrainer, params, refs, labels, batch_size, decoder, image_shape) -> Dict[str, float]:
    from .data import batches

    totals = {"loss": 0.0, "top1": 0.0, "top5": 0.0, "count": 0.0}
    for hb in batches(refs, list(range(len(refs))), batch_size, decoder, image_shape):
        lab = labels[hb.indices.clip(0)]
        out = trainer.eval_step(params, *trainer.put(hb.images, lab, hb.valid.astype(np.float32)))
        for k, v in jax.device_get(out).items():
            totals[k] += float(v)
    n = max(totals["count"], 1.0)
    return {"loss": totals["loss"] / n, "top1": totals["top1"] / n, "top5": totals["top5"] / n,
            "count": int(totals["count"])}


def train(model, variables, train_dir: str, *, val_dir: Optional[str] = None, output_dir: str,
          batch_size: int = 32, cfg: Optional[TrainConfig] = None, workers: int = 2,
          checkpoint_every: int = 100, resume: bool = False, max_steps: Optional[int] = None,
          eval_every: Optional[int] = None, progress: bool = True, log: Callable = print) -> Dict[str, Any]:
    """Fine-tune `model` on an ImageFolder. Writes output_dir/{checkpoint.msgpack, model.msgpack,
    model.json, metrics.jsonl}; returns the final metrics. max_steps stops early (as a crash would;
    --resume continues). The exported model.msgpack loads with create_model(..., checkpoint_path=).
    """
    from .augment import TrainTransform
    from .data import Decoder, list_image_folder
    from .transforms import EvalTransform, resolve_data_config
    from .weights import save_flax_checkpoint

    cfg = cfg or TrainConfig()
    data_cfg = resolve_data_config(model)
    refs, labels, classes = list_image_folder(train_dir)
    if len(classes) != model.num_classes:
        raise ValueError(f"{train_dir} has {len(classes)} classes but the model head has {model.num_classes}: "
                         f"create the model with num_classes={len(classes)}")
    if batch_size % jax.device_count():
        raise ValueError(f"batch size {batch_size} must be a multiple of the device count {jax.device_count()}")
    os.makedirs(output_dir, exist_ok=True)
    tx = make_optimizer(model, variables, cfg)
    state = create_train_state(model, variables, tx, cfg.seed)
    ckpt = os.path.join(output_dir, "checkpoint.msgpack")
    metrics_path = os.path.join(output_dir, "metrics.jsonl")
    if resume and os.path.exists(ckpt):
        state, extra = restore_checkpoint(ckpt, state)
        log(f"resumed from {ckpt} at step {int(state.step)}")
        _truncate_metrics(metrics_path, int(state.step))
    elif os.path.exists(metrics_path):
        os.remove(metrics_path)
    trainer = ShardedTrainer(model, tx, cfg, data_cfg["mean"], data_cfg["std"])
    state = trainer.put_state(state)
    size = data_cfg["input_size"][1:]
    image_shape = (size[0], size[1], 3)
    train_tf = TrainTransform(size, data_cfg["interpolation"], data_cfg["mean"], data_cfg["std"],
                              scale=cfg.crop_scale, hflip=cfg.hflip)
    eval_tf = EvalTransform(size, data_cfg["interpolation"], data_cfg["mean"], data_cfg["std"], data_cfg["crop_pct"])
    val = list_image_folder(val_dir) if val_dir else None
    start = int(state.step)
    end = cfg.total_steps if max_steps is None else min(cfg.total_steps, max_steps)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.total_steps, initial=start, unit="step", desc="finetune", dynamic_ncols=True)
    last: Dict[str, Any] = {}
    t0 = time.perf_counter()
    with Decoder(train_tf, workers=workers, window=2 * batch_size) as dec:
        stream = train_batches(refs, labels, batch_size, cfg.seed, start, dec, image_shape)
        for step in range(start, end):
            images, lab, w, epoch = next(stream)
            state, m = trainer.train_step(state, *trainer.put(images, lab, w))
            m = {k: float(v) for k, v in jax.device_get(m).items()}
            last = dict(step=step + 1, epoch=epoch, **m)
            with open(metrics_path, "a") as f:
                f.write(json.dumps(dict(step=step + 1, epoch=epoch, loss=m["loss"], accuracy=m["accuracy"])) + "\n")
            if bar is not None:
                bar.set_postfix(loss=f"{m['loss']:.3f}", acc=f"{m['accuracy']:.2f}")
                bar.update(1)
            done = step + 1
            if val and eval_every and done % eval_every == 0:
                with Decoder(eval_tf, workers=workers) as vdec:
                    last["val"] = evaluate(trainer, state.params, val[0], val[1], batch_size, vdec, image_shape)
                log(f"step {done}: val top1 {last['val']['top1']:.3f} top5 {last['val']['top5']:.3f}")
            if done % checkpoint_every == 0 or done == end:
                save_checkpoint(ckpt, state, {"step": done, "classes": classes})
    if bar is not None:
        bar.close()
    if val and "val" not in last:
        with Decoder(eval_tf, workers=workers) as vdec:
            last["val"] = evaluate(trainer, state.params, val[0], val[1], batch_size, vdec, image_shape)
    last["seconds"] = time.perf_counter() - t0
    if int(state.step) >= cfg.total_steps:
        host = {"params": jax.device_get(state.params)}
        save_flax_checkpoint(host, model, os.path.join(output_dir, "model.msgpack"))
        with open(os.path.join(output_dir, "classes.json"), "w") as f:
            json.dump(classes, f)
    return last


def _truncate_metrics(path: str, step: int) -> None:
    """Drop metric lines past the checkpoint (steps a killed run did after its last save)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path, "w") as f:
        f.writelines(keep)


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
