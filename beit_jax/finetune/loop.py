"""`train`: open the run (refusals, resume), the loop (steps, metrics, checkpoints, validation)
and the export; `evaluate`."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional

import jax
import numpy as np

from .. import parallel as par
from .._io import atomic_write
from ..checkpoints import model_config_dict, save_flax_checkpoint
from ..data import Decoder, stream_batches
from ..publish import save_hub_folder
from ..sources import list_labelled, shard_urls
from ..storage import join_url, staged_folder, url_exists
from ..transforms import create_transform, resolve_data_config
from .optim import TrainConfig, make_optimizer
from .order import batch_mix_rng, eval_slots, train_batches
from .state import (MetricsLog, open_output, _classes_mismatch, _saved_step, _settings_mismatch, create_train_state,
                    read_checkpoint, save_checkpoint, state_from_checkpoint)
from .steps import Trainer, mix_arrays
from .stream import StreamedSource, check_streams, streamed_train_batches


def evaluate(trainer: Trainer, params, refs, labels, batch_size, decoder, image_shape,
             rows: Optional[slice] = None) -> Dict[str, float]:
    """Top-1/top-5 and mean loss over the whole val set; every process decodes its rows of each
    global batch, the counts are summed over the global batch on the devices (exact)."""
    local = (rows.stop - rows.start) if rows else batch_size
    loss, hits = 0.0, {"top1": 0, "top5": 0, "count": 0}
    slots = ((dataclasses.replace(refs[g], index=g) if g >= 0 else None) for g in eval_slots(len(refs), batch_size, rows))
    for hb in stream_batches(slots, local, decoder, image_shape):
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


@dataclasses.dataclass
class _Run:
    """An opened fine-tuning run: its data, its output folder and the state it continues from."""
    cfg: TrainConfig
    batch_size: int
    output_dir: str
    main: bool  # process 0: the one that writes
    log: Callable
    data_cfg: Dict[str, Any]
    refs: list
    labels: np.ndarray
    classes: List[str]
    state: Any  # TrainState on the host (fresh, or restored from the checkpoint)
    settings: Dict[str, Any]
    metrics: Optional[MetricsLog] = None
    label_column: Optional[str] = None
    path_column: Optional[str] = None
    source: Optional[StreamedSource] = None  # webdataset shards (refs/labels are then empty)
    streams: int = 0
    shuffle_shards: int = 0
    positions: Optional[np.ndarray] = None  # (streams, 3): every stream's (epoch, group, offset)

    @property
    def ckpt(self) -> str:
        return join_url(self.output_dir, "checkpoint.msgpack")

    @property
    def metrics_path(self) -> str:
        return join_url(self.output_dir, "metrics.jsonl")


def train(model, variables, train_dir: str, *, val_dir: Optional[str] = None, output_dir: str,
          batch_size: int = 32, cfg: Optional[TrainConfig] = None, workers: int = 2,
          checkpoint_every: int = 100, resume: bool = False, max_steps: Optional[int] = None,
          eval_every: Optional[int] = None, progress: bool = True, log: Callable = print,
          label_column: Optional[str] = None, path_column: Optional[str] = None, label_key: str = "cls",
          classes: Optional[List[str]] = None, streams: Optional[int] = None,
          shuffle_shards: int = 4) -> Dict[str, Any]:
    """Fine-tune `model` with a global batch of `batch_size` over every device of every process.

    train_dir: an ImageFolder (ROOT/CLASS/IMAGE) on local disk or under a bucket prefix, or a table
    (.parquet/.csv/.jsonl, globs and {a,b} lists too) of image paths/URLs (`path_column`) and labels
    (`label_column`: class indices or names), see sources.list_labelled; or webdataset shards
    ('s3://b/train-{00000..01023}.tar', a glob, or a folder of tars), streamed (see finetune.stream:
    the label from each sample's `label_key` member or .json field; `classes` names the classes
    when labels are names; `streams` and `shuffle_shards` set the order). val_dir: a folder or a
    table. output_dir: a local folder or any fsspec URL (s3://, gs://); every file in it is
    written whole. Writes output_dir/{checkpoint.msgpack, model.msgpack, model.json, classes.json,
    metrics.jsonl} (and model_ema.msgpack with an EMA) and output_dir/hub/ (timm's Hub layout:
    config.json, model.safetensors, README.md; see beit_jax.publish) from process 0 only; returns the final
    metrics. max_steps stops early (as a crash would; resume=True continues: process 0 reads the
    checkpoint and hands it to the others). The export loads with create_model(..., checkpoint_path=).

    Three stages: `_open_run` (refusals, the optimizer, resume), `_loop` (steps, metrics,
    checkpoints, validation), `_export` (the final weights, once every step is done).
    """
    run = _open_run(model, variables, train_dir, output_dir, batch_size, cfg or TrainConfig(), resume, log,
                    label_column, path_column, label_key, classes, streams, shuffle_shards)
    state, last = _loop(run, model, val_dir, workers, checkpoint_every, max_steps, eval_every, progress)
    if int(state.step) >= run.cfg.total_steps and run.main:
        _export(run, model, state, last)
    par.sync("beit_jax.finetune.done")
    return last


def _model_settings(model) -> Dict[str, Any]:
    """What of the model a resume must keep: its architecture, resolution, drop path and dtype."""
    return dict(model_config_dict(model), drop_path_rate=getattr(model, "drop_path_rate", None),
                dtype=jax.numpy.dtype(getattr(model, "dtype", "float32")).name)


def _open_run(model, variables, train_dir: str, output_dir: str, batch_size: int, cfg: TrainConfig,
              resume: bool, log: Callable, label_column: Optional[str] = None,
              path_column: Optional[str] = None, label_key: str = "cls", class_names: Optional[List[str]] = None,
              streams: Optional[int] = None, shuffle_shards: int = 4) -> _Run:
    """Check everything that can be refused, then the train state: fresh, or the checkpoint's
    (process 0 reads it, the output folder need not be shared, and hands it on)."""
    main = jax.process_index() == 0
    log = log if main else (lambda *a, **k: None)
    shards = shard_urls(train_dir)
    source = None
    if shards is not None:
        if label_column or path_column:
            raise ValueError(f"{train_dir} is webdataset shards: their labels come from `label_key` (a member or "
                             f".json field), not `label_column` / `path_column` (those are for tables)")
        if shuffle_shards < 1:
            raise ValueError(f"`shuffle_shards` must be 1 or more, got {shuffle_shards}")
        source = StreamedSource(tuple(shards), label_key, tuple(class_names) if class_names else None,
                                None if class_names else model.num_classes)
        refs, labels, classes = [], np.zeros((0,), np.int32), source.class_names
    else:
        refs, labels, classes = list_labelled(train_dir, label_column, path_column)
    if len(classes) != model.num_classes:
        raise ValueError(f"{train_dir} has {len(classes)} classes but the model head has {model.num_classes}: "
                         f"create the model with num_classes={len(classes)}")
    if batch_size % jax.device_count():
        raise ValueError(f"batch size {batch_size} must be a multiple of the device count {jax.device_count()}")
    if cfg.mixing and cfg.mixup_mode != "batch" and batch_size % 2:
        raise ValueError(f"mixup_mode={cfg.mixup_mode!r} needs an even global batch (timm's Mixup asserts it: rows "
                         f"i and B-1-i are mixed), got batch size {batch_size}: pass an even `batch_size`, or "
                         f"`mixup_mode=batch`")
    open_output(output_dir, resume)
    tx = make_optimizer(model, variables, cfg)
    state = create_train_state(model, variables, tx, cfg.seed, ema=cfg.model_ema_decay is not None)
    settings = dict(_settings(cfg, batch_size), model=_model_settings(model))
    if source is not None:
        settings.update(shuffle_shards=shuffle_shards, shards=source.fingerprint())
    else:  # the listed inputs: a resume on other images (added, removed, relabelled) is refused; their
        # place (the common prefix: a folder moved to another disk or a bucket) may change
        cut = len(os.path.commonprefix([r.id for r in refs])) if len(refs) > 1 else 0
        digest = hashlib.sha256("\n".join(f"{r.id[cut:]}\t{k}" for r, k in zip(refs, labels)).encode()).hexdigest()
        settings.update(data={"images": len(refs), "sha256": digest[:16]})
    run = _Run(cfg, batch_size, output_dir, main, log, resolve_data_config(model), refs, labels, classes, state,
               settings, label_column=label_column, path_column=path_column, source=source,
               shuffle_shards=shuffle_shards)
    found, saved_streams, saved_positions = False, 0, None
    if resume:
        host, status, problem = jax.device_get(state), np.int32(0), ""
        if main and url_exists(run.ckpt):
            payload = read_checkpoint(run.ckpt)
            extra = payload["extra"]
            problem = (_classes_mismatch(run.ckpt, extra.get("classes"), classes)  # the most telling first
                       or _settings_mismatch(run.ckpt, extra.get("settings"), run.settings))
            if not problem:
                try:
                    host = state_from_checkpoint(payload, host, run.ckpt)
                except ValueError as e:
                    problem = str(e)
            if source is not None and not problem:
                saved_streams = int(extra.get("streams", 0))
                saved_positions = np.asarray(extra.get("stream_positions", []), np.int64).reshape(-1, 3)
                if streams is not None and streams != saved_streams:
                    problem = (f"{run.ckpt} was written with streams={saved_streams}, now {streams}: a streamed run "
                               f"keeps its streams (leave `streams` unset to continue it)")
            status = np.int32(2 if problem else 1)
        host, status, saved_streams = par.broadcast_from_process_0((host, status, np.int32(saved_streams)))
        if int(status) == 2:
            raise ValueError(problem or "process 0 refused to resume from its checkpoint (see its error)")
        found = int(status) == 1
        if found:
            run.state = host
            log(f"resumed from {run.ckpt} at step {int(host.step)}")
            if int(host.step) >= cfg.total_steps:
                log(f"note: {run.ckpt} is at its last step ({cfg.total_steps}): the run was done; its exports are "
                    f"written again from the same weights")
            if source is not None:
                template = saved_positions if main else np.zeros((int(saved_streams), 3), np.int64)
                saved_positions = par.broadcast_from_process_0(template)
    if resume and not found:
        log(f"note: no checkpoint in {output_dir} yet: starting the run from step 0")
    if source is not None:
        run.streams = int(saved_streams) if found else (streams or jax.process_count())
        check_streams(run.streams, len(source.shards), batch_size, jax.process_count())
        run.positions = saved_positions if found else np.zeros((run.streams, 3), np.int64)
    # a resumed run drops the lines past its checkpoint; a fresh one (or a resumed run that had not
    # reached its first checkpoint) starts the file anew
    run.metrics = MetricsLog(run.metrics_path, int(run.state.step) if found else 0, write=main)
    return run


def _loop(run: _Run, model, val_dir: Optional[str], workers: int, checkpoint_every: int,
          max_steps: Optional[int], eval_every: Optional[int], progress: bool):
    """Steps from the run's state to total_steps (or max_steps): (final state, last metrics).
    A non-finite loss or parameters stops it before anything of that step is saved."""
    cfg, batch_size, main, log, data_cfg = run.cfg, run.batch_size, run.main, run.log, run.data_cfg
    trainer = Trainer(model, cfg, data_cfg["mean"], data_cfg["std"])
    rows = trainer.dp.process_rows(batch_size)
    state = trainer.put_state(run.state)
    size = data_cfg["input_size"][1:]
    image_shape = (size[0], size[1], 3)
    train_tf = create_transform(**data_cfg, is_training=True, scale=cfg.crop_scale, hflip=cfg.hflip,
                                auto_augment=cfg.aa, re_prob=cfg.reprob, re_mode=cfg.remode)
    eval_tf = create_transform(**data_cfg)
    mixer = cfg.mixer()
    val = _val_by_train_classes(val_dir, run.classes, run.label_column, run.path_column) if val_dir else None
    start = int(state.step)
    end = cfg.total_steps if max_steps is None else min(cfg.total_steps, max_steps)
    bar = None
    if progress and main:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.total_steps, initial=start, unit="step", desc="finetune", dynamic_ncols=True)
    last: Dict[str, Any] = {}
    failed = 0
    t0 = t_first = t_last = time.perf_counter()

    def validate():
        out = {}
        with Decoder(eval_tf, workers=workers) as vdec:
            out["val"] = evaluate(trainer, state.params, val[0], val[1], batch_size, vdec, image_shape, rows)
            if cfg.model_ema_decay is not None:
                out["val_ema"] = evaluate(trainer, state.ema_params, val[0], val[1], batch_size, vdec, image_shape, rows)
        return out

    with Decoder(train_tf, workers=workers, window=2 * (rows.stop - rows.start)) as dec:
        if run.source is None:
            stream = train_batches(run.refs, run.labels, batch_size, cfg.seed, start, dec, image_shape, rows)
        else:
            per = batch_size // jax.process_count()
            if (rows.start, rows.stop) != (jax.process_index() * per, (jax.process_index() + 1) * per):
                raise RuntimeError(f"this process feeds rows {rows.start}-{rows.stop} of each global batch, not "
                                   f"its streams' rows: streamed training needs processes in mesh order")
            stream = streamed_train_batches(run.source, batch_size, cfg.seed, run.streams, run.shuffle_shards,
                                            run.positions, dec, image_shape, jax.process_index(), jax.process_count())
        for step in range(start, end):
            b = next(stream)
            for path, reason in b.errors:  # any process: its own images
                print(f"warning: training sample skipped (weight 0): {reason}", file=sys.stderr, flush=True)
            failed += len(b.errors)
            boxes = np.stack([train_tf.erase_box(int(s)) for s in b.seeds]) if cfg.reprob > 0 else None
            mix = mix_arrays(*mixer.draw(batch_mix_rng(cfg.seed, step), batch_size, *image_shape[:2])) if mixer else None
            state, m = trainer.step(state, b.images, b.labels, b.weights, boxes, b.seeds, mix)
            m = {k: float(v) for k, v in jax.device_get(m).items()}
            t_last = time.perf_counter()  # this step is done (its checkpoint, if any, comes after)
            if m.pop("samples") == 0:
                raise ValueError(f"every one of the {batch_size} samples of global batch {step + 1} failed to decode "
                                 f"or had no usable label (the warnings above say why): the training data cannot be "
                                 f"read as given. Stopped before saving anything of that step; nothing was exported.")
            if not (math.isfinite(m["loss"]) and m.pop("params_finite") == 1.0):
                kept = (f"the last good checkpoint ({run.ckpt}, step {_saved_step(run.ckpt)}) is kept"
                        if main and url_exists(run.ckpt) else "no checkpoint had been written yet")
                raise TrainingDivergedError(
                    f"the loss or the parameters became non-finite at step {step + 1} (loss {m['loss']}): training "
                    f"diverged (is `lr={cfg.lr}` too high, or an input broken?). Stopped before saving anything "
                    f"of that step; {kept}; nothing was exported.")
            if step == start:
                t_first = t_last  # compiled and the input pipeline filled: steady state from here
            last = dict(step=step + 1, epoch=b.epoch, **m)
            run.metrics.add(dict(step=step + 1, epoch=b.epoch, loss=m["loss"], accuracy=m["accuracy"]))
            if bar is not None:
                bar.set_postfix(loss=f"{m['loss']:.3f}", acc=f"{m['accuracy']:.2f}")
                bar.update(1)
            done = step + 1
            if val and eval_every and done % eval_every == 0:
                last.update(validate())
                log(f"step {done}: val top1 {last['val']['top1']:.3f} top5 {last['val']['top5']:.3f}")
            if done % checkpoint_every == 0 or done == end:
                extra = {"step": done, "classes": run.classes, "settings": run.settings}
                if run.source is not None:  # every process's streams (a collective: all processes take part)
                    extra.update(streams=run.streams, stream_positions=par.gather_rows(b.positions).tolist())
                if main:
                    run.metrics.flush()  # first: lines past a checkpoint are dropped on resume, missing ones would be lost
                    save_checkpoint(run.ckpt, state, extra)
    if bar is not None:
        bar.close()
    if val and "val" not in last:
        last.update(validate())
    # steady state: the steps after the first, to the end of the last one (without the final checkpoint write)
    steady = (end - start - 1) * batch_size / (t_last - t_first) if end - start > 1 and t_last > t_first else None
    last.update(seconds=time.perf_counter() - t0, steady_images_per_sec=steady, processes=jax.process_count(),
                devices=jax.device_count(), local_batch=rows.stop - rows.start, train_images_failed_here=failed)
    return state, last


def _export(run: _Run, model, state, last: Dict[str, Any]) -> None:
    """The trained weights for create_model / flax_to_timm (and the EMA's), the class names, and
    hub/: timm's Hugging Face Hub folder (the EMA's weights when an EMA was kept, as timm's
    train.py evaluates and keeps the EMA then; model.msgpack keeps the raw weights)."""
    with staged_folder(run.output_dir) as out:  # the output folder itself, or uploaded from a local one
        _write_exports(out, run, model, state, last)


def _write_exports(out: str, run: _Run, model, state, last: Dict[str, Any]) -> None:
    host = jax.device_get(state)
    save_flax_checkpoint({"params": host.params}, model, os.path.join(out, "model.msgpack"))
    ema = run.cfg.model_ema_decay is not None
    if ema:
        save_flax_checkpoint({"params": host.ema_params}, model, os.path.join(out, "model_ema.msgpack"))
    atomic_write(os.path.join(out, "classes.json"), json.dumps(run.classes))
    cfg = run.cfg
    weights = (f"the EMA of the fine-tuned weights (decay {cfg.model_ema_decay} per optimizer step), as timm's "
               f"train.py evaluates and keeps the EMA when one is on; the raw final weights are the run's "
               f"model.msgpack" if ema else f"the final fine-tuned weights (step {int(host.step)})")
    notes = [f"**Training:** {cfg.total_steps} steps at global batch {run.batch_size}, lr {cfg.lr:g}, layer decay "
             f"{cfg.layer_decay}, weight decay {cfg.weight_decay}, label smoothing {cfg.label_smoothing}"
             + (f", RandAugment {cfg.aa}" if cfg.aa else "") + (f", random erasing {cfg.reprob}" if cfg.reprob else "")
             + (f", mixup {cfg.mixup} / cutmix {cfg.cutmix} ({cfg.mixup_mode} mode)" if cfg.mixing else "")]
    val = last.get("val_ema" if ema else "val")
    if val:
        notes.append(f"**Validation ({val['count']} images):** top-1 {val['top1']:.4f}, top-5 {val['top5']:.4f}")
    save_hub_folder(os.path.join(out, "hub"), model, {"params": host.ema_params if ema else host.params},
                    label_names=run.classes, weights=weights, notes=notes)


class TrainingDivergedError(RuntimeError):
    """The loss stopped being a finite number."""


def _val_by_train_classes(val_dir: str, classes: List[str], label_column: Optional[str] = None,
                          path_column: Optional[str] = None):
    """The validation set with labels matched to the training classes by name."""
    if shard_urls(val_dir) is not None:
        raise ValueError(f"{val_dir} is webdataset shards: validation reads an ImageFolder or a table (every image "
                         f"exactly once, counted exactly); give `val_dir` one of those")
    refs, labels, val_classes = list_labelled(val_dir, label_column, path_column)
    unknown = [c for c in val_classes if c not in classes]
    if unknown:
        hint = (" (the training labels are class indices, so its classes are named '0'..'"
                f"{len(classes) - 1}': give the validation set the same kind of labels)"
                if all(c.isdigit() for c in classes) and not all(c.isdigit() for c in val_classes) else "")
        raise ValueError(f"{val_dir} has classes the training set does not have: {unknown[:10]} (the model "
                         f"could never predict them); remove them or add them to `train_dir`{hint}")
    index = {c: i for i, c in enumerate(classes)}
    return refs, np.asarray([index[val_classes[label]] for label in labels], np.int32), val_classes
