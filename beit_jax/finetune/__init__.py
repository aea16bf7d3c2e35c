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

One module per job: `optim` (parameter groups, TrainConfig, recipes, the optimizer), `state`
(train state, checkpoints, the output folder's checks), `order` (data order and per-sample seeds),
`steps` (the jitted train/eval steps, Trainer), `stream` (webdataset shards: order and positions),
`loop` (`train`: open the run, the loop, the export; `evaluate`), `probe` (`linear_probe`).
Everything is importable from here.
"""
from __future__ import annotations

from .loop import TrainingDivergedError, _val_by_train_classes, evaluate, train  # noqa: F401
from .optim import (MATCH_PREV_GROUP, RECIPE_BATCH, RECIPES, TrainConfig, layer_ids, layer_lr_multipliers,  # noqa: F401
                    make_optimizer, recipe_key, recipe_settings, scale_by_tree, weight_decay_mask)
from .order import TrainBatch, batch_mix_rng, epoch_order, eval_slots, sample_seed, train_batches  # noqa: F401
from .probe import linear_probe  # noqa: F401
from .state import TrainState, create_train_state, restore_checkpoint, save_checkpoint  # noqa: F401
from .steps import NO_MIX, Trainer, make_eval_step, make_train_step, mix_arrays  # noqa: F401

__all__ = [
    "TrainConfig", "TrainState", "Trainer", "TrainingDivergedError", "TrainBatch", "RECIPES", "RECIPE_BATCH",
    "train", "evaluate", "linear_probe", "layer_ids", "layer_lr_multipliers", "weight_decay_mask", "make_optimizer",
    "recipe_key", "recipe_settings", "scale_by_tree", "create_train_state", "save_checkpoint", "restore_checkpoint",
    "make_train_step", "make_eval_step", "mix_arrays", "train_batches", "epoch_order", "sample_seed",
    "batch_mix_rng", "eval_slots", "NO_MIX", "MATCH_PREV_GROUP",
]
