"""Parameter groups (timm's layer decay and no-weight-decay rules), TrainConfig, the published
BEiT recipes and the optimizer they make."""
from __future__ import annotations

import dataclasses
import fnmatch
import itertools
import math
import re
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from .. import augment
from .._config import check_numbers, option
from ..mapping import flax_path_to_timm_key


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
    lr: float = option(5e-4, "peak learning rate for the global batch (BEiT's published value per model, e.g. "
                                "4e-3 for BEiT-base at batch 1024, comes with --recipe beit, scaled to the batch)")
    min_lr: float = option(1e-6, "final learning rate of the cosine schedule")
    weight_decay: float = option(0.05, "AdamW weight decay (not on 1-D params, cls token, position tables)")
    layer_decay: float = option(0.65, "layer-wise lr decay: block i gets lr * decay ** (depth + 1 - i)")
    warmup_steps: int = option(100, "linear warmup steps (--recipe beit: from its warmup epochs)")
    total_steps: int = option(1000, "total optimizer steps (--recipe beit: from its epochs)", flag="--steps")
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
    mixup_mode: str = option("batch", "what shares one mixup/cutmix draw (timm's Mixup mode): batch: the whole batch; "
                                      "pair: each pair of rows (i, B-1-i); elem: each row (pair and elem need an "
                                      "even batch)", choices=augment.MIXUP_MODES)
    model_ema_decay: Optional[float] = option(None, "keep an EMA of the weights with this decay per optimizer "
                                                  "step (timm's ModelEma, e.g. 0.9999); evaluated and "
                                                  "exported too (default: off)")

    def __post_init__(self):
        self.crop_scale = tuple(self.crop_scale)
        self.aa = self.aa or None
        bad = check_numbers(self, ("lr", "min_lr", "weight_decay", "layer_decay", "label_smoothing", "b1", "b2",
                                   "hflip", "reprob", "mixup", "cutmix", "mixup_prob", "mixup_switch_prob"))
        if not (0 < self.crop_scale[0] <= self.crop_scale[1] <= 1):
            bad.append(f"crop_scale={self.crop_scale} (need 0 < min <= max <= 1)")
        if not (self.label_smoothing < 1 and self.hflip <= 1 and self.b1 < 1 and self.b2 < 1):
            bad.append("label_smoothing, b1 and b2 must be < 1 and hflip <= 1")
        if not (self.reprob <= 1 and self.mixup_prob <= 1 and self.mixup_switch_prob <= 1):
            bad.append("reprob, mixup_prob and mixup_switch_prob are probabilities (<= 1)")
        if self.mixup_mode not in augment.MIXUP_MODES:
            bad.append(f"mixup_mode={self.mixup_mode!r} (one of {', '.join(augment.MIXUP_MODES)})")
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
                             label_smoothing=self.label_smoothing, mode=self.mixup_mode)


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


def recipe_settings(name: str, model, num_train_images: Optional[int], batch_size: Optional[int] = None,
                    steps: Optional[int] = None) -> Tuple[Dict[str, Any], int, float, str]:
    """The published fine-tuning settings for `model`'s family and size.

    Returns (TrainConfig keyword arguments, global batch, drop path rate, a line saying what was
    chosen). The lr is published for a global batch of 1024: another batch scales it linearly.
    Epochs become steps at this batch (`steps` overrides them; warmup keeps its fraction). A
    streamed source is not counted (num_train_images None): it needs `steps`.
    """
    if name != "beit":
        raise ValueError(f"unknown recipe {name!r} (known: beit)")
    key = recipe_key(model)
    r = RECIPES[key]
    batch = batch_size or RECIPE_BATCH
    if num_train_images is None and not steps:
        raise ValueError("webdataset shards are streamed, not counted: the recipe's epochs cannot become steps; "
                         "pass `steps`")
    steps_per_epoch = num_train_images // batch if num_train_images is not None else None
    if steps_per_epoch == 0:
        raise ValueError(f"{num_train_images} training images is less than one batch of {batch}: pass a smaller "
                         f"`batch_size`")
    total = steps or int(r["epochs"] * steps_per_epoch)
    warmup = int(round(total * r["warmup_epochs"] / r["epochs"]))
    cfg = dict(RECIPE_COMMON, lr=r["lr"] * batch / RECIPE_BATCH, layer_decay=r["layer_decay"],
               total_steps=total, warmup_steps=warmup)
    note = (f"recipe beit ({key[0]} {key[1]}): lr {r['lr']:g} at batch {RECIPE_BATCH} -> {cfg['lr']:.3g} at batch "
            f"{batch}, layer decay {r['layer_decay']}, drop path {r['drop_path']}, "
            f"{total} steps" + (f" ({total / steps_per_epoch:.3g} epochs)" if steps_per_epoch else "")
            + f", {warmup} warmup, aa {cfg['aa']}, "
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
