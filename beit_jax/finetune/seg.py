"""Fine-tuning a BEiT + UPerNet segmenter with unilm's ADE20K recipe, on one device or a pod.

The recipe (unilm beit/semantic_segmentation, configs upernet_beit_*_640_slide_160k_ade20k_pt2ft):
AdamW (betas 0.9/0.999, weight decay 0.05) with unilm's layer decay (`LayerDecayOptimizerConstructor`:
cls token / position embedding / patch embedding layer 0, block i layer i + 1, everything else,
the FPN and both heads included, the top layer at lr x 1; weight decay on every parameter of 2 or
more dimensions, none on biases and other 1-D ones, as that constructor does), mmcv's poly
schedule (power 1 to 0) with a linear warmup from lr x 1e-6 (the warmup multiplies the poly
value, as mmcv's), the auxiliary FCN loss at weight 0.4, drop path from the model's config, batch
16 (8 GPUs x 2). Base: lr 3e-5, layer decay 0.9, 1500 warmup of 160k steps; large: 2e-5, 0.95,
3000 (`SEG_RECIPES`, `--recipe ade20k`; the lr scales linearly with another batch). The loss is
transformers' (`BeitForSemanticSegmentation(labels=...)`): logits upsampled bilinearly to the
labels, cross entropy averaged over the pixels not ignored (255), main + 0.4 x auxiliary.

Data parallelism is classification's (`parallel.DataParallel`): the global batch is split over
every device of every process, each process decodes only its rows, BatchNorm statistics are
those of the global batch (SyncBN, as mmseg trains). Every random choice is a function of (seed,
epoch, sample index) or (seed, step), so a resume (and another number of processes) continues
the same run exactly. Evaluation is mmseg's: each validation image at its own size (slide or
whole, `segmentation.segment_logits`), confusion matrices summed over processes, mIoU / mAcc /
aAcc / per-class IoU (`seg_data.segmentation_metrics`).

Output folder: checkpoint.msgpack (resumable), metrics.jsonl (train steps), eval.jsonl
(validations), and when done model/ (a transformers save_pretrained folder:
`create_segmentation_model(OUTPUT/model)` and `BeitForSemanticSegmentation.from_pretrained` both
load it).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .. import parallel as par
from .._config import check_numbers, option
from ..models.segmentation import BeitSegmenter, resize_bilinear
from ..segmentation import MODES, SEG_MEAN, SEG_STD, device_runner, save_hf_folder, segment_logits
from ..transforms import load_image, normalize
from .optim import scale_by_tree
from .order import epoch_order, sample_seed
from .seg_data import (IGNORE, SegAugment, confusion, list_segmentation_folder, load_train_sample, ordered_map,
                       read_label_map, segmentation_metrics, split_rows)
from ..storage import join_url, protocol_of, staged_folder, url_exists, write_whole
from .state import (MetricsLog, open_output, TrainState, _saved_step, _settings_mismatch,
                    read_checkpoint, save_checkpoint, state_from_checkpoint)


@dataclasses.dataclass
class SegTrainConfig:
    """Optimizer, schedule, loss and augmentation of segmentation fine-tuning (unilm's ADE20K
    recipe for BEiT-base by default, but the run length: see `SEG_RECIPES`)."""
    lr: float = option(3e-5, "peak learning rate (unilm BEiT-base ADE20K: 3e-5 at batch 16)")
    min_lr: float = option(0.0, "final learning rate of the poly schedule")
    power: float = option(1.0, "poly schedule power")
    weight_decay: float = option(0.05, "AdamW weight decay (on parameters of 2+ dimensions, as unilm)")
    layer_decay: float = option(0.9, "layer-wise lr decay: block i gets lr * decay ** (depth + 1 - (i + 1)); "
                                     "0.9 for intermediate-fine-tuned BEiTs, 0.65 for self-supervised ones")
    warmup_steps: int = option(1500, "linear warmup steps (from lr * warmup_ratio)")
    warmup_ratio: float = option(1e-6, "learning rate at step 0, as a fraction of the schedule's")
    total_steps: int = option(160000, "total optimizer steps", flag="--steps")
    b1: float = option(0.9, "AdamW beta1")
    b2: float = option(0.999, "AdamW beta2")
    grad_accum: int = option(1, "accumulate gradients over N batches per optimizer step")
    aux_weight: Optional[float] = option(None, "auxiliary FCN loss weight (default: the model config's, 0.4)")
    seed: int = option(0, "seed of the data order, augmentation and drop path")
    scale_range: Tuple[float, float] = option((0.5, 2.0), "random resize ratio range of (4 x crop, crop)")
    cat_max_ratio: float = option(0.75, "re-draw a crop (up to 10 times) where one class covers more than this")
    hflip: float = option(0.5, "horizontal flip probability")
    photometric: bool = option(True, "apply mmseg's photometric distortion", flag="--no-photometric")
    reduce_zero_label: bool = option(False, "label 0 means 'other' (ADE20K): map it to 255 (ignored), k to k - 1")
    eval_mode: str = option("slide", "validation inference (mmseg's ADE20K setting: slide)", choices=MODES)
    eval_stride: Optional[int] = option(None, "slide stride (default: 2/3 of the crop, 426 for 640)")

    def __post_init__(self):
        self.scale_range = tuple(float(v) for v in self.scale_range)
        bad = check_numbers(self, ("lr", "min_lr", "power", "weight_decay", "layer_decay", "warmup_ratio", "b1", "b2",
                                   "hflip", "cat_max_ratio"))
        if not 0 < self.scale_range[0] <= self.scale_range[1]:
            bad.append(f"scale_range={self.scale_range} (need 0 < min <= max)")
        if not (self.hflip <= 1 and self.b1 < 1 and self.b2 < 1 and self.warmup_ratio <= 1):
            bad.append("hflip and warmup_ratio must be <= 1, b1 and b2 < 1")
        if self.aux_weight is not None and not (math.isfinite(self.aux_weight) and self.aux_weight >= 0):
            bad.append(f"aux_weight={self.aux_weight} (must be >= 0)")
        if self.eval_mode not in MODES:
            bad.append(f"eval_mode={self.eval_mode!r} (one of {', '.join(MODES)})")
        if bad:
            raise ValueError("invalid segmentation training settings: " + "; ".join(bad))


SEG_RECIPE_BATCH = 16  # 8 GPUs x 2 images (large: 8 x 1, 2 accumulated)
SEG_RECIPES = {  # unilm's *_640_slide_160k_ade20k_pt2ft configs (BEiTs fine-tuned on ImageNet-22k first)
    "base": dict(lr=3e-5, layer_decay=0.9, warmup_steps=1500, total_steps=160000),
    "large": dict(lr=2e-5, layer_decay=0.95, warmup_steps=3000, total_steps=160000),
}


def seg_recipe_settings(name: str, model: BeitSegmenter, batch_size: Optional[int] = None,
                        steps: Optional[int] = None) -> Tuple[Dict[str, Any], int, str]:
    """(SegTrainConfig keyword arguments, global batch, a line saying what was chosen) of unilm's
    ADE20K recipe for the model's size; the lr scales linearly from batch 16, warmup keeps its
    fraction of `steps`."""
    if name != "ade20k":
        raise ValueError(f"unknown segmentation recipe {name!r} (known: ade20k)")
    size = "large" if model.config.hidden_size >= 1024 else "base"
    r = SEG_RECIPES[size]
    batch = batch_size or SEG_RECIPE_BATCH
    total = steps or r["total_steps"]
    warmup = int(round(total * r["warmup_steps"] / r["total_steps"]))
    cfg = dict(lr=r["lr"] * batch / SEG_RECIPE_BATCH, layer_decay=r["layer_decay"], warmup_steps=warmup,
               total_steps=total, weight_decay=0.05, min_lr=0.0, power=1.0, warmup_ratio=1e-6,
               reduce_zero_label=True, eval_mode="slide")
    note = (f"recipe ade20k ({size}): lr {r['lr']:g} at batch {SEG_RECIPE_BATCH} -> {cfg['lr']:.3g} at batch {batch}, "
            f"layer decay {r['layer_decay']}, {total} steps, {warmup} warmup, poly, aux weight "
            f"{model.config.auxiliary_loss_weight}, reduce_zero_label, slide evaluation")
    return cfg, batch, note


# ---- the optimizer -------------------------------------------------------------------------------
def seg_layer_ids(params, depth: int):
    """unilm's layer ids over the segmenter's params: 0 for the backbone's cls token, position
    embedding and patch embedding, i + 1 for block i, depth + 1 for everything else."""
    def lid(path) -> int:
        if path[0] != "backbone":
            return depth + 1
        if path[1] in ("cls_token", "pos_embed", "patch_embed", "mask_token"):
            return 0
        if path[1].startswith("blocks_"):
            return int(path[1].split("_")[1]) + 1
        return depth + 1

    return jax.tree_util.tree_map_with_path(lambda kp, _: lid(tuple(str(k.key) for k in kp)), params)


def poly_schedule(cfg: SegTrainConfig) -> optax.Schedule:
    """mmcv's poly lr with linear warmup (by iteration): poly(t) = (lr - min_lr) (1 - t / T) ** power
    + min_lr, times (1 - (1 - t / W) (1 - warmup_ratio)) while t < W."""
    def schedule(count):
        t = jnp.minimum(jnp.asarray(count, jnp.float32), cfg.total_steps)
        regular = (cfg.lr - cfg.min_lr) * (1.0 - t / cfg.total_steps) ** cfg.power + cfg.min_lr
        if cfg.warmup_steps == 0:
            return regular
        # 1 - (1 - t / W)(1 - ratio), written so float32 keeps the ratio exact at t = 0
        warm = cfg.warmup_ratio + (1.0 - cfg.warmup_ratio) * t / cfg.warmup_steps
        return jnp.where(t < cfg.warmup_steps, regular * warm, regular)

    return schedule


def make_seg_optimizer(model: BeitSegmenter, params, cfg: SegTrainConfig) -> optax.GradientTransformation:
    depth = model.config.num_hidden_layers
    mults = jax.tree_util.tree_map(lambda i: float(cfg.layer_decay ** (depth + 1 - i)), seg_layer_ids(params, depth))
    decay_mask = jax.tree_util.tree_map(lambda p: np.ndim(p) > 1, params)
    tx = optax.chain(optax.scale_by_adam(cfg.b1, cfg.b2, eps=1e-8),
                     optax.add_decayed_weights(cfg.weight_decay, decay_mask),
                     scale_by_tree(mults), optax.scale_by_learning_rate(poly_schedule(cfg)))
    return optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum) if cfg.grad_accum > 1 else tx


# ---- state, loss, steps --------------------------------------------------------------------------
class SegTrainState(TrainState):
    """The train state plus the BatchNorm statistics."""
    batch_stats: Any = dataclasses.field(default_factory=dict)


def create_seg_train_state(model: BeitSegmenter, variables, cfg: SegTrainConfig) -> SegTrainState:
    params = jax.tree_util.tree_map(jnp.asarray, variables["params"])
    state = SegTrainState.create(apply_fn=model.apply, params=params, tx=make_seg_optimizer(model, params, cfg),
                                 rng=jax.random.PRNGKey(cfg.seed),
                                 batch_stats=jax.tree_util.tree_map(jnp.asarray, variables.get("batch_stats", {})))
    return state.replace(step=jnp.zeros((), jnp.int32))


def seg_cross_entropy(logits, labels, ignore: int = IGNORE):
    """transformers' segmentation loss: logits (B, h, w, K) upsampled bilinearly to labels (B, H, W),
    cross entropy averaged over the pixels that are not `ignore`. Returns (loss, correct pixels,
    counted pixels)."""
    up = resize_bilinear(logits.astype(jnp.float32), labels.shape[1:3])
    logp = jax.nn.log_softmax(up, axis=-1)
    valid = labels != ignore
    lab = jnp.where(valid, labels, 0).astype(jnp.int32)
    nll = -jnp.take_along_axis(logp, lab[..., None], axis=-1)[..., 0]
    count = valid.sum()
    loss = jnp.where(valid, nll, 0.0).sum() / jnp.maximum(count, 1)
    correct = ((up.argmax(-1) == lab) & valid).sum()
    return loss, correct, count


def seg_loss(model: BeitSegmenter, variables, x, labels, aux_weight: Optional[float] = None, train: bool = False,
             rng=None):
    """(main + aux_weight * auxiliary loss, (main loss, correct, counted, new batch_stats or None))."""
    aux_weight = model.config.auxiliary_loss_weight if aux_weight is None else aux_weight
    if train:
        (logits, aux), new = model.apply(variables, x, train=True, method=BeitSegmenter.forward_aux,
                                         mutable=["batch_stats"], rngs={"dropout": rng})
        stats = new["batch_stats"]
    else:
        logits, aux = model.apply(variables, x, method=BeitSegmenter.forward_aux)
        stats = None
    main, correct, count = seg_cross_entropy(logits, labels, model.config.semantic_loss_ignore_index)
    total = main if aux is None else main + aux_weight * seg_cross_entropy(aux, labels,
                                                                           model.config.semantic_loss_ignore_index)[0]
    return total, (main, correct, count, stats)


def make_seg_train_step(model: BeitSegmenter, cfg: SegTrainConfig, mean=SEG_MEAN, std=SEG_STD) -> Callable:
    """(state, images uint8 (B, S, S, 3), labels uint8 (B, S, S), valid extents (B, 2)) -> (state,
    metrics). Pure; jit it. Normalises on the device; pixels outside a sample's extent are padding
    (0 after normalisation, label 255), as mmseg's Pad."""

    def step(state: SegTrainState, images, labels, extents):
        rng, step_rng = jax.random.split(state.rng)
        step_rng = jax.random.fold_in(step_rng, state.step)
        x = normalize(images, mean, std)
        h = jnp.arange(x.shape[1])[None, :, None] < extents[:, 0, None, None]
        w = jnp.arange(x.shape[2])[None, None, :] < extents[:, 1, None, None]
        x = jnp.where((h & w)[..., None], x, 0.0).astype(x.dtype)
        labels = labels.astype(jnp.int32)

        def loss_fn(params):
            return seg_loss(model, {"params": params, "batch_stats": state.batch_stats}, x, labels, cfg.aux_weight,
                            train=True, rng=step_rng)

        (loss, (main, correct, count, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        new = state.apply_gradients(grads=grads, rng=rng, batch_stats=stats)
        finite = jnp.all(jnp.stack([jnp.isfinite(p).all() for p in jax.tree_util.tree_leaves(new.params)]))
        return new, {"loss": loss, "decode_loss": main, "pixel_acc": correct / jnp.maximum(count, 1),
                     "params_finite": finite.astype(jnp.float32)}

    return step


# ---- evaluation ------------------------------------------------------------------------------------
def evaluate_segmenter(model: BeitSegmenter, variables, samples, cfg: Optional[SegTrainConfig] = None,
                       runner=None) -> Dict[str, Any]:
    """mmseg's metrics over `samples` (seg_data.SegSample), each image at its own size; with
    jax.distributed every process segments its share and the confusion matrices are summed."""
    cfg = cfg or SegTrainConfig()
    k = model.config.num_labels
    conf = np.zeros((k, k), np.int64)
    if runner is None and jax.process_count() == 1:
        runner = device_runner(model, variables)
    for i in split_rows(len(samples), jax.process_count(), jax.process_index()):
        s = samples[i]
        lab = read_label_map(s.annotation, k, cfg.reduce_zero_label)
        img = load_image(s.image)
        pred = segment_logits(model, variables, img, mode=cfg.eval_mode, stride=cfg.eval_stride,
                              runner=runner).argmax(-1)
        if pred.shape != lab.shape:
            raise ValueError(f"{s.image} is {pred.shape[1]}x{pred.shape[0]} but its label map {s.annotation} is "
                             f"{lab.shape[1]}x{lab.shape[0]}: a label map has the image's size")
        conf += confusion(pred, lab, k)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        conf = np.asarray(multihost_utils.process_allgather(conf)).reshape(-1, k, k).sum(0)
    return dict(segmentation_metrics(conf, model.config.label_names), images=len(samples))


# ---- the loop -------------------------------------------------------------------------------------
def _host(tree):
    """A replicated (possibly multi-process) pytree as numpy: this process's first copy."""
    return jax.tree_util.tree_map(lambda a: np.asarray(a.addressable_data(0)) if isinstance(a, jax.Array)
                                  else np.asarray(a), tree)


def _train_items(samples, batch_size: int, seed: int, start_step: int, rows: slice):
    """(step, epoch, sample, seed) for this process's rows of every global batch from start_step on
    (the last partial batch of an epoch dropped, as classification's)."""
    steps_per_epoch = len(samples) // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(samples)} training images is less than one batch of {batch_size}: pass a smaller "
                         f"`batch_size`")
    epoch, offset = divmod(start_step, steps_per_epoch)
    step = start_step
    while True:
        order = epoch_order(len(samples), seed, epoch)
        for k in range(offset, steps_per_epoch):
            for p in order[k * batch_size + rows.start: k * batch_size + rows.stop]:
                yield step, epoch, samples[p], sample_seed(seed, epoch, int(p))
            step += 1
        epoch, offset = epoch + 1, 0


def train_segmenter(model: BeitSegmenter, variables, data_dir: str, *, output_dir: str, batch_size: int = 16,
                    cfg: Optional[SegTrainConfig] = None, train_split: str = "training",
                    val_split: Optional[str] = None, workers: int = 2, checkpoint_every: int = 1000,
                    resume: bool = False, max_steps: Optional[int] = None, eval_every: Optional[int] = None,
                    progress: bool = True, log: Callable = print) -> Dict[str, Any]:
    """Fine-tune `model` on data_dir/{images,annotations}/<train_split> with a global batch of
    `batch_size` over every device of every process; evaluate on `val_split` (every `eval_every`
    steps and at the end). Writes output_dir from process 0 (see the module docstring); returns
    the last metrics. max_steps stops early (as a crash would); resume=True continues exactly."""
    cfg = cfg or SegTrainConfig()
    main = jax.process_index() == 0
    log = log if main else (lambda *a, **k: None)
    samples = list_segmentation_folder(data_dir, train_split)
    val = list_segmentation_folder(data_dir, val_split) if val_split else None
    if batch_size % jax.device_count():
        raise ValueError(f"batch size {batch_size} must be a multiple of the device count {jax.device_count()}")
    open_output(output_dir, resume)
    ckpt, metrics_path, eval_path = (join_url(output_dir, n) for n in ("checkpoint.msgpack", "metrics.jsonl",
                                                                           "eval.jsonl"))
    settings = dict(dataclasses.asdict(cfg), scale_range=list(cfg.scale_range), batch_size=batch_size,
                    train_split=train_split, num_labels=model.config.num_labels, image_size=model.config.image_size,
                    model=dict(hidden_size=model.config.hidden_size, layers=model.config.num_hidden_layers,
                               drop_path_rate=model.config.drop_path_rate, dtype=jnp.dtype(model.dtype).name))
    state = create_seg_train_state(model, variables, cfg)
    found = False
    if resume:
        host, status, problem = jax.device_get(state), np.int32(0), ""
        if main and url_exists(ckpt):
            payload = read_checkpoint(ckpt)
            extra = payload["extra"]
            problem = _settings_mismatch(ckpt, extra.get("settings"), settings)
            if not problem:
                try:
                    host = state_from_checkpoint(payload, host, ckpt)
                except ValueError as e:
                    problem = str(e)
            status = np.int32(2 if problem else 1)
        host, status = par.broadcast_from_process_0((host, status))
        if int(status) == 2:
            raise ValueError(problem or "process 0 refused to resume from its checkpoint (see its error)")
        found = int(status) == 1
        if found:
            state = host
            log(f"resumed from {ckpt} at step {int(host.step)}")
    metrics, evals = (MetricsLog(p, int(state.step) if found else 0, write=main) for p in (metrics_path, eval_path))

    if not found and _exported(output_dir):
        raise FileExistsError(f"{join_url(output_dir, 'model')} already exists and this run did not write it: "
                              f"use another `output_dir` (nothing was changed)")
    start = int(state.step)
    dp = par.DataParallel("sharded")
    train_step = dp.train_step(make_seg_train_step(model, cfg), num_batch_args=3)
    rows = dp.process_rows(batch_size)
    local = rows.stop - rows.start
    state = dp.replicate(state)
    crop = model.config.image_size
    augment = SegAugment(crop, cfg.scale_range, cfg.cat_max_ratio, cfg.hflip, cfg.photometric)
    k = model.config.num_labels
    end = cfg.total_steps if max_steps is None else min(cfg.total_steps, max_steps)
    bar = None
    if progress and main:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.total_steps, initial=start, unit="step", desc="finetune-seg", dynamic_ncols=True)
    last: Dict[str, Any] = {}
    failed, t0 = 0, time.perf_counter()

    def validate(done: int):
        res = evaluate_segmenter(model, {"params": _host(state.params), "batch_stats": _host(state.batch_stats)},
                                 val, cfg)
        evals.add(dict(step=done, **res))
        evals.flush()
        log(f"step {done}: val mIoU {res['mIoU']:.4f} mAcc {res['mAcc']:.4f} aAcc {res['aAcc']:.4f}")
        return res

    load = lambda item: load_train_sample(item[2], item[3], augment, k, cfg.reduce_zero_label)  # noqa: E731
    # the items of steps [start, end) only, so no worker decodes past the end
    decoded = ordered_map(load, _take(_train_items(samples, batch_size, cfg.seed, start, rows), (end - start) * local),
                          workers, window=2 * local)
    for step in range(start, end):
        got = [next(decoded) for _ in range(local)]
        errors = [e for *_, e in got if e]
        for e in errors:
            print(f"warning: training image skipped (weight 0): {e}", file=sys.stderr, flush=True)
        failed += len(errors)
        images = np.stack([g[0] for g in got])
        labels = np.stack([g[1] for g in got])
        extents = np.asarray([g[2] for g in got], np.int32)
        state, m = train_step(state, *dp.put_batch(images, labels, extents))
        m = {key: float(v) for key, v in jax.device_get(m).items()}
        if not (math.isfinite(m["loss"]) and m.pop("params_finite") == 1.0):
            from .loop import TrainingDivergedError

            kept = (f"the last good checkpoint ({ckpt}, step {_saved_step(ckpt)}) is kept"
                    if main and url_exists(ckpt) else "no checkpoint had been written yet")
            raise TrainingDivergedError(f"the loss or the parameters became non-finite at step {step + 1} (loss "
                                        f"{m['loss']}): training diverged (is `lr={cfg.lr}` too high?). Stopped "
                                        f"before saving anything of that step; {kept}; nothing was exported.")
        done = step + 1
        last = dict(step=done, **m)
        metrics.add(last)
        if bar is not None:
            bar.set_postfix(loss=f"{m['loss']:.3f}", acc=f"{m['pixel_acc']:.2f}")
            bar.update(1)
        if val and eval_every and done % eval_every == 0:
            last["val"] = validate(done)
        if (done % checkpoint_every == 0 or done == end) and main:
            metrics.flush()  # first: lines past a checkpoint are dropped on resume, missing ones would be lost
            save_checkpoint(ckpt, jax.device_get(_host(state)), {"step": done, "settings": settings})
    if bar is not None:
        bar.close()
    if val and "val" not in last:
        last["val"] = validate(max(end, start))
    finished = int(_host(state.step)) >= cfg.total_steps
    if finished and main:
        _export(output_dir, model, state)
    par.sync("beit_jax.finetune_seg.done")
    last.update(seconds=time.perf_counter() - t0, processes=jax.process_count(), devices=jax.device_count(),
                local_batch=local, train_images_failed_here=failed, exported=finished)
    return last


def _take(it, n: int):
    for _, x in zip(range(n), it):
        yield x


def _exported(output_dir: str) -> bool:
    return url_exists(join_url(output_dir, "model.json")) or url_exists(join_url(output_dir, "model", "config.json"))


def _export(output_dir: str, model: BeitSegmenter, state) -> None:
    """output_dir/model: a transformers folder, complete before model.json says it is there (locally
    written beside and renamed into place; on a bucket uploaded file by file, then model.json)."""
    if url_exists(join_url(output_dir, "model.json")):  # this run's export (a fresh run refuses a folder with one)
        return
    variables = {"params": _host(state.params), "batch_stats": _host(state.batch_stats)}
    if protocol_of(output_dir) in ("file", "local"):
        final = os.path.join(output_dir, "model")
        if not os.path.exists(final):  # else complete (renamed whole) by a try that stopped before model.json
            tmp = os.path.join(output_dir, f".model.tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            save_hf_folder(tmp, model, variables)
            os.replace(tmp, final)
    else:
        with staged_folder(join_url(output_dir, "model")) as tmp:
            save_hf_folder(tmp, model, variables)
    write_whole(join_url(output_dir, "model.json"), json.dumps({"format": "transformers BeitForSemanticSegmentation",
                                                                "folder": "model"}).encode())
