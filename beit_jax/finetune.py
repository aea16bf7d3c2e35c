"""Fine-tuning and linear probing with optax, the BEiT recipe, on one device or a pod.

AdamW with layer-wise lr decay exactly as timm's `param_groups_layer_decay` (layers from the
model's `group_matcher()`, no weight decay on 1-D params and the model's `no_weight_decay()`
names); warmup + cosine; label smoothing; drop path from the model's rng; optional gradient
accumulation (optax.MultiSteps); bf16 compute over fp32 master params; RandAugment, random
erasing, mixup/cutmix and a weights EMA as timm does them (`augment.py`), `RECIPES` for the
published settings.

Multi-host: the batch size is global. The train step is data-parallel over every device of every
process through `parallel.DataParallel`; each process decodes only its rows of each global batch.
Where an augmentation happens, and why:
  host, per sample (decode workers): crop, flip, RandAugment (PIL), the erasing box (numpy);
  device, in the jitted step: normalize, erasing's noise (it lives in normalized space), mixup
  and cutmix (they pair row i with row B-1-i of the *global* batch, which no process holds).
Every random choice is a function of (seed, epoch, sample index) or (seed, step) alone, so a
resumed run and a run on another number of processes see the same augmentation. Checkpoints
(flax.serialization, atomic, written by process 0) hold params, optimizer state, step, rng and
EMA; evaluation runs on every process with exact top-1/top-5 counts.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import itertools
import json
import math
import os
import re
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, serialization
from flax.training import train_state

from . import augment
from . import parallel as par
from ._io import atomic_write
from .checkpoints import save_flax_checkpoint
from .data import Decoder, batches, list_image_folder
from ._config import option
from .mapping import flax_path_to_timm_key
from .transforms import create_transform, normalize, resolve_data_config

MATCH_PREV_GROUP = 99999  # timm: a group ordinal ending in this joins the group before it


# ---- parameter groups ---------------------------------------------------------------------------
def _params(variables):
    return variables["params"] if "params" in variables else variables


def _is_param(x) -> bool:  # an NNX Variable is one parameter (a leaf here), not a subtree
    return isinstance(x, nnx.Variable)


def _flax_path(keypath) -> Tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in keypath)


def _map_params(fn: Callable, variables):
    """fn(Flax path, leaf) for every parameter, in a tree of the same containers as the params:
    nested dicts for linen variables, an nnx.State for `nnx.state(model, nnx.Param)`."""
    return jax.tree_util.tree_map_with_path(lambda kp, leaf: fn(_flax_path(kp), leaf), _params(variables),
                                            is_leaf=_is_param)


def _timm_names(variables) -> Dict[str, Tuple[str, ...]]:
    leaves = jax.tree_util.tree_flatten_with_path(_params(variables), is_leaf=_is_param)[0]
    return {flax_path_to_timm_key(_flax_path(kp)): _flax_path(kp) for kp, _ in leaves}


def layer_ids(model, variables) -> Dict[Tuple[str, ...], int]:
    """Flax param path -> layer id: timm's group_with_matcher(model.group_matcher(), reverse=True)
    (BEiT: stem 0, block i -> i + 1, the final norm with the last block, head/fc_norm last)."""
    compiled = []
    for ordinal, spec in enumerate(model.group_matcher(coarse=False).values()):
        if spec is None:
            continue
        specs = spec if isinstance(spec, (tuple, list)) else [(spec, None)]
        compiled += [(re.compile(rx), (ordinal,), suffix) for rx, suffix in specs]

    def ordinal_of(name: str) -> Tuple[float, ...]:
        for rx, prefix, suffix in compiled:
            m = rx.match(name)
            if m:
                return tuple(map(float, itertools.chain.from_iterable(filter(None, (prefix, m.groups(), suffix)))))
        return (math.inf,)  # unmatched layers (head, fc_norm) get the largest ordinal

    ordinals = {path: ordinal_of(name) for name, path in _timm_names(variables).items()}
    ranks, lid = {}, -1
    for o in sorted(set(ordinals.values())):
        if lid < 0 or o[-1] != MATCH_PREV_GROUP:
            lid += 1
        ranks[o] = lid
    return {p: ranks[o] for p, o in ordinals.items()}


def layer_lr_multipliers(model, variables, layer_decay: float = 0.65):
    """Pytree like variables['params'], one float per leaf: timm's lr_scale = decay ** (L - layer).
    Also takes an NNX model's `nnx.state(model, nnx.Param)` (then returns an nnx.State)."""
    ids = layer_ids(model, variables)
    top = max(ids.values())
    return _map_params(lambda path, _: float(layer_decay ** (top - ids[path])), variables)


def weight_decay_mask(model, variables):
    """Pytree of bools like variables['params']: True where weight decay applies (timm's rule: not
    on 1-D params nor on the model's `no_weight_decay()` names). NNX state in, nnx.State out."""
    no_decay = model.no_weight_decay()

    def decays(path, leaf) -> bool:
        name = flax_path_to_timm_key(path)
        return not (len(np.shape(leaf)) <= 1 or any(fnmatch.fnmatch(name, pat) for pat in no_decay))

    return _map_params(decays, variables)


def scale_by_tree(multipliers) -> optax.GradientTransformation:
    """Multiply each update leaf by a fixed per-leaf float (layer-wise lr decay)."""

    def init(params):
        return optax.EmptyState()

    def update(updates, state, params=None):
        return jax.tree_util.tree_map(lambda u, m: u * jnp.asarray(m, u.dtype), updates, multipliers), state

    return optax.GradientTransformation(init, update)


@dataclasses.dataclass
class TrainConfig:
    """Optimizer, schedule and augmentation settings (the BEiT fine-tuning recipe's knobs).

    Augmentations are off by default where timm's are (RandAugment, random erasing, mixup,
    cutmix, EMA); `recipe_settings("beit", ...)` (`beit-jax finetune --recipe beit`) turns on
    the published BEiT values.
    """
    lr: float = option(5e-4, "peak learning rate (BEiT: 5e-4 for batch 1024; scale linearly)")
    min_lr: float = option(1e-6, "final learning rate of the cosine schedule")
    weight_decay: float = option(0.05, "AdamW weight decay (not on 1-D params, cls token, position tables)")
    layer_decay: float = option(0.65, "layer-wise lr decay: block i gets lr * decay ** (depth + 1 - i)")
    warmup_steps: int = option(100, "linear warmup steps")
    total_steps: int = option(1000, "total optimizer steps", flag="--steps")
    label_smoothing: float = option(0.1, "label smoothing (with mixup/cutmix: of the mixed targets, as timm)")
    b1: float = option(0.9, "AdamW beta1")
    b2: float = option(0.999, "AdamW beta2")
    grad_accum: int = option(1, "accumulate gradients over N batches per optimizer step")
    clip_grad_norm: Optional[float] = option(None, "clip gradients to this global norm (default: off)")
    seed: int = option(0, "seed of the data order, augmentation and drop path")
    crop_scale: Tuple[float, float] = option((0.08, 1.0), "RandomResizedCrop area range (timm's default)")
    hflip: float = option(0.5, "horizontal flip probability")
    aa: Optional[str] = option(None, "RandAugment policy in timm's syntax, e.g. rand-m9-mstd0.5-inc1 (BEiT's); "
                                   "default: off")
    reprob: float = option(0.0, "random erasing probability (timm's RandomErasing; BEiT: 0.25)")
    remode: str = option("pixel", "random erasing fill: per-pixel N(0,1) noise (BEiT's), one random colour, or zeros",
                       choices=("pixel", "rand", "const"))
    mixup: float = option(0.0, "mixup alpha, on when > 0 (BEiT: 0.8)")
    cutmix: float = option(0.0, "cutmix alpha, on when > 0 (BEiT: 1.0)")
    mixup_prob: float = option(1.0, "probability of mixing a batch when mixup or cutmix is on")
    mixup_switch_prob: float = option(0.5, "probability of cutmix instead of mixup when both are on")
    model_ema_decay: Optional[float] = option(None, "keep an EMA of the weights with this decay per optimizer "
                                                  "step (timm's ModelEma, e.g. 0.9999); evaluated and "
                                                  "exported too (default: off)")

    def __post_init__(self):
        self.crop_scale = tuple(self.crop_scale)
        self.aa = self.aa or None
        bad = []
        for name in ("lr", "min_lr", "weight_decay", "layer_decay", "label_smoothing", "b1", "b2", "hflip",
                     "reprob", "mixup", "cutmix", "mixup_prob", "mixup_switch_prob"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                bad.append(f"{name}={value} (must be a finite number >= 0)")
        if not self.lr > 0:
            bad.append(f"lr={self.lr} (must be > 0)")
        if self.total_steps < 1 or self.grad_accum < 1 or self.warmup_steps < 0:
            bad.append(f"steps={self.total_steps}, grad_accum={self.grad_accum}, warmup_steps={self.warmup_steps} "
                       f"(need steps >= 1, grad_accum >= 1, warmup_steps >= 0)")
        if not (0 < self.crop_scale[0] <= self.crop_scale[1] <= 1):
            bad.append(f"crop_scale={self.crop_scale} (need 0 < min <= max <= 1)")
        if not (self.label_smoothing < 1 and self.hflip <= 1 and self.b1 < 1 and self.b2 < 1):
            bad.append("label_smoothing, b1 and b2 must be < 1 and hflip <= 1")
        if not (self.reprob <= 1 and self.mixup_prob <= 1 and self.mixup_switch_prob <= 1):
            bad.append("reprob, mixup_prob and mixup_switch_prob are probabilities (<= 1)")
        if self.remode not in augment.ERASE_MODES:
            bad.append(f"remode={self.remode!r} (one of {', '.join(augment.ERASE_MODES)})")
        if self.clip_grad_norm is not None and not (math.isfinite(self.clip_grad_norm) and self.clip_grad_norm > 0):
            bad.append(f"clip_grad_norm={self.clip_grad_norm} (must be > 0)")
        if self.model_ema_decay is not None and not 0 <= self.model_ema_decay < 1:
            bad.append(f"model_ema_decay={self.model_ema_decay} (must be in [0, 1), e.g. 0.9999)")
        if self.aa:
            try:
                augment.RandAugment.from_config(self.aa)
            except ValueError as e:
                bad.append(f"aa: {e}")
        if bad:
            raise ValueError("invalid training settings: " + "; ".join(bad))

    @property
    def mixing(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0

    def mixer(self) -> Optional[augment.Mixup]:
        if not self.mixing:
            return None
        return augment.Mixup(self.mixup, self.cutmix, prob=self.mixup_prob, switch_prob=self.mixup_switch_prob,
                             label_smoothing=self.label_smoothing)


# ---- the published recipe -----------------------------------------------------------------------
RECIPE_BATCH = 1024  # every published BEiT fine-tuning run uses a global batch of 1024
# unilm's BEiT (beit/get_started_for_image_classification.md, self-supervised checkpoints: "we
# recommend mixup and cutmix") and BEiT v2 (beit2/get_started_for_image_classification.md,
# pretrained checkpoints, 1600 epochs) fine-tuning commands; the rest are run_class_finetuning.py's
# defaults: aa rand-m9-mstd0.5-inc1, smoothing 0.1, reprob 0.25 (pixel mode), min_lr 1e-6,
# weight decay 0.05, RandomResizedCrop (0.08, 1) + flip 0.5, no gradient clipping, no EMA.
RECIPES: Dict[Tuple[str, str], Dict[str, float]] = {
    ("beit", "base"): dict(lr=4e-3, layer_decay=0.65, drop_path=0.1, epochs=100, warmup_epochs=20),
    ("beit", "large"): dict(lr=1e-3, layer_decay=0.75, drop_path=0.2, epochs=50, warmup_epochs=5),
    ("beitv2", "base"): dict(lr=5e-4, layer_decay=0.6, drop_path=0.2, epochs=100, warmup_epochs=20),
    ("beitv2", "large"): dict(lr=2e-4, layer_decay=0.8, drop_path=0.2, epochs=50, warmup_epochs=5),
}
RECIPE_COMMON: Dict[str, Any] = dict(weight_decay=0.05, min_lr=1e-6, label_smoothing=0.1, aa="rand-m9-mstd0.5-inc1",
                                     reprob=0.25, remode="pixel", mixup=0.8, cutmix=1.0, mixup_prob=1.0,
                                     mixup_switch_prob=0.5, crop_scale=(0.08, 1.0), hflip=0.5, clip_grad_norm=None)


def recipe_key(model) -> Tuple[str, str]:
    """(family, size) of a model for RECIPES: 'beitv2' for beitv2_* architectures, else 'beit';
    'large' from width 1024 up, else 'base' (smaller test models take base's settings)."""
    cfg = getattr(model, "pretrained_cfg", None)
    family = "beitv2" if cfg is not None and cfg.architecture.startswith("beitv2") else "beit"
    return family, ("large" if model.embed_dim >= 1024 else "base")


def recipe_settings(name: str, model, num_train_images: int, batch_size: Optional[int] = None,
                    steps: Optional[int] = None) -> Tuple[Dict[str, Any], int, float, str]:
    """The published fine-tuning settings for `model`'s family and size.

    Returns (TrainConfig keyword arguments, global batch, drop path rate, a line saying what was
    chosen). The lr is published for a global batch of 1024: another batch scales it linearly.
    Epochs become steps at this batch (`steps` overrides them; warmup keeps its fraction).
    """
    if name != "beit":
        raise ValueError(f"unknown recipe {name!r} (known: beit)")
    key = recipe_key(model)
    r = RECIPES[key]
    batch = batch_size or RECIPE_BATCH
    steps_per_epoch = num_train_images // batch
    if steps_per_epoch == 0:
        raise ValueError(f"{num_train_images} training images is less than one batch of {batch}: pass a smaller "
                         f"`batch_size`")
    total = steps or int(r["epochs"] * steps_per_epoch)
    warmup = int(round(total * r["warmup_epochs"] / r["epochs"]))
    cfg = dict(RECIPE_COMMON, lr=r["lr"] * batch / RECIPE_BATCH, layer_decay=r["layer_decay"],
               total_steps=total, warmup_steps=warmup)
    note = (f"recipe beit ({key[0]} {key[1]}): lr {r['lr']:g} at batch {RECIPE_BATCH} -> {cfg['lr']:.3g} at batch "
            f"{batch}, layer decay {r['layer_decay']}, drop path {r['drop_path']}, "
            f"{total} steps ({total / steps_per_epoch:.3g} epochs), {warmup} warmup, aa {cfg['aa']}, "
            f"mixup {cfg['mixup']}, cutmix {cfg['cutmix']}, smoothing {cfg['label_smoothing']}, "
            f"reprob {cfg['reprob']}")
    return cfg, batch, r["drop_path"], note


def make_optimizer(model, variables, cfg: TrainConfig) -> optax.GradientTransformation:
    """AdamW(warmup+cosine) with layer-wise lr decay and timm's no-decay set. variables: linen
    variables, or `nnx.state(model, nnx.Param)` of a `create_nnx_model` model (for nnx.Optimizer)."""
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
class TrainState(train_state.TrainState):
    """flax's TrainState (step, params, tx, opt_state) plus the dropout/drop-path rng and the
    weights' EMA ({} when off)."""
    rng: jax.Array
    ema_params: Any = dataclasses.field(default_factory=dict)


def create_train_state(model, variables, tx, seed: int = 0, ema: bool = False) -> TrainState:
    params = jax.tree_util.tree_map(jnp.asarray, _params(variables))
    state = TrainState.create(apply_fn=model.apply, params=params, tx=tx, rng=jax.random.PRNGKey(seed),
                              ema_params=jax.tree_util.tree_map(jnp.array, params) if ema else {})
    return state.replace(step=jnp.zeros((), jnp.int32))


NO_MIX = {"lam": np.float32(1.0), "cutmix": np.bool_(False), "box": np.zeros(4, np.int32)}


def mix_arrays(lam: float, use_cutmix: bool, box) -> Dict[str, np.ndarray]:
    """A batch's mixup parameters (augment.Mixup.params) as the train step takes them."""
    return {"lam": np.float32(lam), "cutmix": np.bool_(use_cutmix), "box": np.asarray(box, np.int32)}


def _loss_fn(model, params, x, targets, weights, rng):
    logits = model.apply({"params": params}, x, deterministic=False, rngs={"dropout": rng}).astype(jnp.float32)
    per_example = optax.softmax_cross_entropy(logits, targets)
    denom = jnp.maximum(weights.sum(), 1.0)
    return (per_example * weights).sum() / denom, logits


def make_train_step(model, cfg: TrainConfig, mean, std) -> Callable:
    """(state, images uint8 (B,H,W,3), labels (B,), weights (B,), erase boxes (B,4), sample seeds
    (B,), mix {lam, cutmix, box}) -> (state, metrics). Pure; jit it.

    On the device, over the global batch: normalize, random erasing (noise from each sample's
    seed), mixup/cutmix (row i with row B-1-i of the global batch) and mixed smoothed targets,
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
        return new, {"loss": loss, "accuracy": acc, "params_finite": finite.astype(jnp.float32)}

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


# ---- checkpoints --------------------------------------------------------------------------------
def save_checkpoint(path: str, state: TrainState, extra: Optional[Dict[str, Any]] = None) -> None:
    """Atomically write the whole train state (params, optimizer, step, rng, EMA) + JSON-able extras."""
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


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A sample's augmentation seed: a function of (seed, epoch, dataset index) only, so neither
    a resume nor the number of processes changes any crop, op, magnitude or erasing box."""
    return int(np.random.default_rng([seed, epoch, int(index)]).integers(2 ** 31))


def batch_mix_rng(seed: int, step: int) -> np.random.Generator:
    """The random stream of global batch `step`'s mixup/cutmix draw (its own spawn key: no
    overlap with the per-sample streams)."""
    return np.random.default_rng(np.random.SeedSequence([seed, step], spawn_key=(1,)))


@dataclasses.dataclass
class TrainBatch:
    """This process's rows of one global batch."""
    images: np.ndarray  # (b, H, W, 3) uint8
    labels: np.ndarray  # (b,) int32
    weights: np.ndarray  # (b,) float32, 0 for an image that failed to decode
    seeds: np.ndarray  # (b,) int32 per-sample augmentation seeds
    epoch: int
    errors: list  # (path, reason) of the images that failed to decode


class _SeededRefs:
    """refs[picks[j]] with its augmentation seed, computed when the decoder asks for it."""

    def __init__(self, refs, picks, seed: int, epoch: int):
        self.refs, self.picks, self.seed, self.epoch = refs, picks, seed, epoch

    def __len__(self):
        return len(self.picks)

    def seed_of(self, j: int) -> int:
        return sample_seed(self.seed, self.epoch, self.picks[j])

    def __getitem__(self, j: int):
        return dataclasses.replace(self.refs[self.picks[j]], seed=self.seed_of(j))


def train_batches(refs, labels, batch_size: int, seed: int, start_step: int, decoder, image_shape,
                  rows: Optional[slice] = None):
    """Endless TrainBatch-es (this process's `rows` of each global batch of `batch_size`) from
    global step `start_step` on.

    Drops the last partial global batch of each epoch (as timm's train loader does); each sample
    gets its own augmentation seed from (seed, epoch, index).
    """
    rows = rows or slice(0, batch_size)
    steps_per_epoch = len(refs) // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(refs)} training images is less than one batch of {batch_size}")
    epoch, offset = divmod(start_step, steps_per_epoch)
    while True:
        order = epoch_order(len(refs), seed, epoch)
        picks = np.concatenate([order[k * batch_size + rows.start: k * batch_size + rows.stop]
                                for k in range(offset, steps_per_epoch)])
        seeded = _SeededRefs(refs, picks, seed, epoch)
        for hb in batches(seeded, range(len(seeded)), rows.stop - rows.start, decoder, image_shape):
            at = hb.indices.clip(0)
            seeds = np.asarray([seeded.seed_of(j) for j in at], np.int32)
            errors = [(refs[picks[j]].id, reason) for j, reason in hb.errors]
            yield TrainBatch(hb.images, labels[picks[at]], hb.valid.astype(np.float32), seeds, epoch, errors)
        epoch, offset = epoch + 1, 0


def eval_slots(num: int, batch_size: int, rows: Optional[slice] = None) -> list:
    """Indices (-1: padding) this process evaluates: its rows of each global batch of the val set."""
    rows = rows or slice(0, batch_size)
    return [g if g < num else -1 for k in range(math.ceil(num / batch_size))
            for g in range(k * batch_size + rows.start, k * batch_size + rows.stop)]


def evaluate(trainer: Trainer, params, refs, labels, batch_size, decoder, image_shape,
             rows: Optional[slice] = None) -> Dict[str, float]:
    """Top-1/top-5 and mean loss over the whole val set; every process decodes its rows of each
    global batch, the counts are summed over the global batch on the devices (exact)."""
    local = (rows.stop - rows.start) if rows else batch_size
    loss, hits = 0.0, {"top1": 0, "top5": 0, "count": 0}
    for hb in batches(refs, eval_slots(len(refs), batch_size, rows), local, decoder, image_shape):
        lab = labels[hb.indices.clip(0)]
        out = jax.device_get(trainer.eval_step(params, *trainer.put(hb.images, lab, hb.valid.astype(np.float32))))
        loss += float(out["loss"])
        for k in hits:
            hits[k] += int(out[k])
    n = max(hits["count"], 1)
    return {"loss": loss / n, "top1": hits["top1"] / n, "top5": hits["top5"] / n, "count": hits["count"],
            "top1_hits": hits["top1"], "top5_hits": hits["top5"]}


def _settings(cfg: TrainConfig, batch_size: int) -> Dict[str, Any]:
    return dict(dataclasses.asdict(cfg), batch_size=batch_size, crop_scale=list(cfg.crop_scale))


def train(model, variables, train_dir: str, *, val_dir: Optional[str] = None, output_dir: str,
          batch_size: int = 32, cfg: Optional[TrainConfig] = None, workers: int = 2,
          checkpoint_every: int = 100, resume: bool = False, max_steps: Optional[int] = None,
          eval_every: Optional[int] = None, progress: bool = True, log: Callable = print) -> Dict[str, Any]:
    """Fine-tune `model` on an ImageFolder with a global batch of `batch_size` over every device of
    every process. Writes output_dir/{checkpoint.msgpack, model.msgpack, model.json, classes.json,
    metrics.jsonl} (and model_ema.msgpack with an EMA) from process 0 only; returns the final
    metrics. max_steps stops early (as a crash would; resume=True continues: process 0 reads the
    checkpoint and hands it to the others). The export loads with create_model(..., checkpoint_path=).
    """
    cfg = cfg or TrainConfig()
    main = jax.process_index() == 0
    log = log if main else (lambda *a, **k: None)
    data_cfg = resolve_data_config(model)
    refs, labels, classes = list_image_folder(train_dir)
    if len(classes) != model.num_classes:
        raise ValueError(f"{train_dir} has {len(classes)} classes but the model head has {model.num_classes}: "
                         f"create the model with num_classes={len(classes)}")
    if batch_size % jax.device_count():
        raise ValueError(f"batch size {batch_size} must be a multiple of the device count {jax.device_count()}")
    if main:
        os.makedirs(output_dir, exist_ok=True)
    refusal = _check_output(output_dir, resume) if main else ""
    if not par.all_processes_agree(np.array([not refusal]))[0]:
        raise ValueError(refusal or "process 0 refused the output folder (see its error)")
    tx = make_optimizer(model, variables, cfg)
    state = create_train_state(model, variables, tx, cfg.seed, ema=cfg.model_ema_decay is not None)
    ckpt = os.path.join(output_dir, "checkpoint.msgpack")
    metrics_path = os.path.join(output_dir, "metrics.jsonl")
    settings = _settings(cfg, batch_size)
    found = False
    if resume:
        # process 0 reads the checkpoint (the output folder need not be shared) and hands it on
        host, status, problem = jax.device_get(state), np.int32(0), ""
        if main and os.path.exists(ckpt):
            host, extra = restore_checkpoint(ckpt, host)
            problem = (_settings_mismatch(ckpt, extra.get("settings"), settings)
                       or _classes_mismatch(ckpt, extra.get("classes"), classes))
            status = np.int32(2 if problem else 1)
        host, status = par.broadcast_from_process_0((host, status))
        if int(status) == 2:
            raise ValueError(problem or "process 0 refused to resume from its checkpoint (see its error)")
        found = int(status) == 1
        if found:
            state = host
            log(f"resumed from {ckpt} at step {int(state.step)}")
            if main:
                _truncate_metrics(metrics_path, int(state.step))
    if main and not found:
        _truncate_metrics(metrics_path, 0)  # ours: a resumed run that had not reached its first checkpoint
    trainer = Trainer(model, cfg, data_cfg["mean"], data_cfg["std"])
    rows = trainer.dp.process_rows(batch_size)
    state = trainer.put_state(state)
    size = data_cfg["input_size"][1:]
    image_shape = (size[0], size[1], 3)
    train_tf = create_transform(**data_cfg, is_training=True, scale=cfg.crop_scale, hflip=cfg.hflip,
                                auto_augment=cfg.aa, re_prob=cfg.reprob, re_mode=cfg.remode)
    eval_tf = create_transform(**data_cfg)
    mixer = cfg.mixer()
    val = _val_by_train_classes(val_dir, classes) if val_dir else None
    start = int(state.step)
    end = cfg.total_steps if max_steps is None else min(cfg.total_steps, max_steps)
    bar = None
    if progress and main:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.total_steps, initial=start, unit="step", desc="finetune", dynamic_ncols=True)
    last: Dict[str, Any] = {}
    failed = 0
    t0 = time.perf_counter()

    def validate():
        out = {}
        with Decoder(eval_tf, workers=workers) as vdec:
            out["val"] = evaluate(trainer, state.params, val[0], val[1], batch_size, vdec, image_shape, rows)
            if cfg.model_ema_decay is not None:
                out["val_ema"] = evaluate(trainer, state.ema_params, val[0], val[1], batch_size, vdec, image_shape, rows)
        return out

    with Decoder(train_tf, workers=workers, window=2 * (rows.stop - rows.start)) as dec:
        stream = train_batches(refs, labels, batch_size, cfg.seed, start, dec, image_shape, rows)
        for step in range(start, end):
            b = next(stream)
            for path, reason in b.errors:  # any process: its own images
                print(f"warning: training image skipped (weight 0): {reason}", file=sys.stderr, flush=True)
            failed += len(b.errors)
            boxes = np.stack([train_tf.erase_box(int(s)) for s in b.seeds]) if cfg.reprob > 0 else None
            mix = mix_arrays(*mixer.params(batch_mix_rng(cfg.seed, step), *image_shape[:2])) if mixer else None
            state, m = trainer.step(state, b.images, b.labels, b.weights, boxes, b.seeds, mix)
            m = {k: float(v) for k, v in jax.device_get(m).items()}
            if not (math.isfinite(m["loss"]) and m.pop("params_finite") == 1.0):
                kept = (f"the last good checkpoint ({ckpt}, step {_saved_step(ckpt)}) is kept"
                        if main and os.path.exists(ckpt) else "no checkpoint had been written yet")
                raise TrainingDivergedError(
                    f"the loss or the parameters became non-finite at step {step + 1} (loss {m['loss']}): training diverged (is `lr={cfg.lr}` too high, "
                    f"or an input broken?). Stopped before saving anything of that step; {kept}; nothing was "
                    f"exported.")
            last = dict(step=step + 1, epoch=b.epoch, **m)
            if main:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(dict(step=step + 1, epoch=b.epoch, loss=m["loss"], accuracy=m["accuracy"])) + "\n")
            if bar is not None:
                bar.set_postfix(loss=f"{m['loss']:.3f}", acc=f"{m['accuracy']:.2f}")
                bar.update(1)
            done = step + 1
            if val and eval_every and done % eval_every == 0:
                last.update(validate())
                log(f"step {done}: val top1 {last['val']['top1']:.3f} top5 {last['val']['top5']:.3f}")
            if (done % checkpoint_every == 0 or done == end) and main:
                save_checkpoint(ckpt, state, {"step": done, "classes": classes, "settings": settings})
    if bar is not None:
        bar.close()
    if val and "val" not in last:
        last.update(validate())
    last.update(seconds=time.perf_counter() - t0, processes=jax.process_count(), devices=jax.device_count(),
                local_batch=rows.stop - rows.start, train_images_failed_here=failed)
    if int(state.step) >= cfg.total_steps and main:
        host = jax.device_get(state)
        save_flax_checkpoint({"params": host.params}, model, os.path.join(output_dir, "model.msgpack"))
        if cfg.model_ema_decay is not None:
            save_flax_checkpoint({"params": host.ema_params}, model, os.path.join(output_dir, "model_ema.msgpack"))
        atomic_write(os.path.join(output_dir, "classes.json"), json.dumps(classes))
    par.sync("beit_jax.finetune.done")
    return last


class TrainingDivergedError(RuntimeError):
    """The loss stopped being a finite number."""


def _saved_step(path: str) -> int:
    with open(path, "rb") as f:
        return int(json.loads(serialization.msgpack_restore(f.read())["extra"]).get("step", 0))


def _check_output(output_dir: str, resume: bool) -> str:
    """Why this output folder must not be written without resume ('' if it may)."""
    ours = [n for n in ("checkpoint.msgpack", "metrics.jsonl", "model.msgpack") if os.path.exists(os.path.join(output_dir, n))]
    if ours and not resume:
        return (f"{output_dir} already holds a fine-tuning run ({', '.join(ours)}): pass `resume=True` to continue it, "
                f"or use another `output_dir` (nothing was changed)")
    return ""


def _classes_mismatch(path: str, saved: Optional[List[str]], now: List[str]) -> str:
    if saved is None or list(saved) == list(now):
        return ""
    gone, new = sorted(set(saved) - set(now)), sorted(set(now) - set(saved))
    how = (f"missing now: {gone[:10]}; new: {new[:10]}" if gone or new else "the same names in another order")
    return (f"{path} was trained on other classes than `train_dir` has now ({how}): labels would mean other "
            f"classes. Use another `output_dir`, or the same training classes")


def _val_by_train_classes(val_dir: str, classes: List[str]):
    """The validation ImageFolder with labels matched to the training classes by name."""
    refs, labels, val_classes = list_image_folder(val_dir)
    unknown = [c for c in val_classes if c not in classes]
    if unknown:
        raise ValueError(f"{val_dir} has classes the training set does not have: {unknown[:10]} (the model "
                         f"could never predict them); remove them or add them to `train_dir`")
    index = {c: i for i, c in enumerate(classes)}
    return refs, np.asarray([index[val_classes[label]] for label in labels], np.int32), val_classes


def _settings_mismatch(path: str, saved: Optional[Dict[str, Any]], now: Dict[str, Any]) -> str:
    """Why a resume with `now` settings would continue another run than the checkpoint's ('' if
    it would not)."""
    if not saved:
        return ""
    diff = [f"{k}: checkpoint {saved.get(k)!r}, now {now.get(k)!r}" for k in sorted(set(saved) | set(now))
            if json.loads(json.dumps(saved.get(k))) != json.loads(json.dumps(now.get(k)))]
    if not diff:
        return ""
    return (f"{path} was written with other settings ({'; '.join(diff)}): resume with the same settings, "
            f"or start a new `output_dir`")


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
