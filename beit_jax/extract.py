"""Feature extraction over large image sets: resumable, multi-device, multi-host, nothing lost.

Output folder layout:
  manifest.json                 model, weights fingerprint, outputs, data config, layout, status
  shard-SSSSS-pPPP-of-NNN.npz   rows of process PPP for shard SSSSS: `ids` (global input index),
                                `paths`, one array per output, and the inputs that failed
  failed.jsonl                  {"path", "error"} per unreadable input (written at the end)

Every process owns a contiguous slice of the inputs and writes its own shards, each atomically
(temp file + rename). A shard on disk is finished, so `resume` skips it; processes agree on what
to skip so they stay in lockstep. `read_features(DIR)` gives the rows back in input order.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from . import parallel as par
from ._io import atomic_write
from .data import Decoder, ImageRef, batches, list_images
from .model import cast_for_inference, default_micro_batch
from .transforms import EvalTransform, normalize, resolve_data_config

OUTPUTS = ("pooled", "tokens", "logits")
MANIFEST = "manifest.json"
FAILED = "failed.jsonl"
_SHARD_RE = re.compile(r"^shard-(\d{5})-p(\d{3})-of-(\d{3})\.npz$")
# Fields of the manifest that must match to add rows to an existing folder.
_IDENTITY_KEYS = ("model", "weights_sha256", "outputs", "dtype", "img_size", "data_config", "num_inputs",
                  "inputs_sha256", "process_count", "local_batch_size", "rows_per_shard")


class OutputMismatchError(RuntimeError):
    """The output folder holds results of another model, config or input list."""


def make_forward(model, outputs: Sequence[str], mean, std):
    """Per-device function: uint8 (B, H, W, 3) images -> {output: float32 (B, ...)}."""
    outputs = tuple(outputs)
    if "logits" in outputs and model.num_classes == 0:
        raise ValueError("'logits' needs a classifier head; this model has num_classes=0")

    def forward(variables, images):
        x = normalize(images, mean, std)
        tokens = model.apply(variables, x, method="forward_features")
        out = {}
        if "tokens" in outputs:
            out["tokens"] = tokens.astype(jnp.float32)
        if "pooled" in outputs or "logits" in outputs:
            pooled = model.apply(variables, tokens, pre_logits=True, method="forward_head")
            if "pooled" in outputs:
                out["pooled"] = pooled.astype(jnp.float32)
            if "logits" in outputs:
                out["logits"] = model.apply(variables, pooled, method=_apply_head).astype(jnp.float32)
        return out

    return forward


def _apply_head(module, pooled):
    return module.head(pooled)


def weights_fingerprint(variables) -> str:
    h = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(variables)[0], key=lambda kv: str(kv[0])):
        a = np.asarray(leaf)
        h.update(str(path).encode() + str(a.dtype).encode() + str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _inputs_fingerprint(refs: Sequence[ImageRef]) -> str:
    h = hashlib.sha256()
    for r in refs:
        h.update(r.id.encode("utf-8", "surrogateescape") + b"\0")
    return h.hexdigest()


@dataclasses.dataclass
class Plan:
    """Which global inputs this process handles, shard by shard (identical step counts everywhere)."""
    num_inputs: int
    process_index: int
    process_count: int
    local_batch: int
    batches_per_shard: int

    @property
    def chunk(self) -> int:
        return math.ceil(self.num_inputs / self.process_count)

    @property
    def rows_per_shard(self) -> int:
        return self.local_batch * self.batches_per_shard

    @property
    def num_shards(self) -> int:
        return math.ceil(self.chunk / self.rows_per_shard)

    def shard_slots(self, shard: int) -> List[int]:
        """Global indices of the shard's rows on this process, -1-padded to whole batches."""
        lo = self.process_index * self.chunk
        hi = min(self.num_inputs, lo + self.chunk)
        start = shard * self.rows_per_shard
        nominal = min(self.rows_per_shard, self.chunk - start)  # same on every process
        slots = [lo + o for o in range(start, start + nominal) if lo + o < hi]
        steps = math.ceil(nominal / self.local_batch)
        return slots + [-1] * (steps * self.local_batch - len(slots))


def shard_name(shard: int, process: int, count: int) -> str:
    return f"shard-{shard:05d}-p{process:03d}-of-{count:03d}.npz"


def _check_or_write_manifest(output_dir: str, manifest: Dict[str, Any], resume: bool) -> None:
    path = os.path.join(output_dir, MANIFEST)
    existing = None
    if os.path.exists(path):
        with open(path) as f:
            existing = json.load(f)
    has_shards = any(_SHARD_RE.match(n) for n in os.listdir(output_dir))
    if existing is not None or has_shards:
        if existing is None:
            raise OutputMismatchError(f"{output_dir} holds shard files but no {MANIFEST}; use an empty folder")
        diffs = [k for k in _IDENTITY_KEYS if existing.get(k) != manifest.get(k)]
        if diffs:
            detail = "; ".join(f"{k}: folder has {existing.get(k)!r}, this run {manifest.get(k)!r}"
                               for k in diffs if k not in ("weights_sha256", "inputs_sha256"))
            named = ", ".join(diffs)
            raise OutputMismatchError(
                f"{output_dir} holds outputs of a different run ({named} differ{': ' + detail if detail else ''}). "
                f"Use another --output folder; to resume, rerun with the same model, weights, inputs, "
                f"outputs, dtype, --batch-size and process count.")
        if not resume and existing.get("status") != "complete":
            raise OutputMismatchError(f"{output_dir} holds an unfinished run of the same config: pass --resume "
                                      f"to continue it, or use another --output folder")
        if not resume:
            raise OutputMismatchError(f"{output_dir} already holds a complete run; pass --resume to reuse it "
                                      f"(nothing to do) or use another --output folder")
    if jax.process_index() == 0:
        atomic_write(path, json.dumps(dict(manifest, status="running"), indent=2))


def extract(
    src,
    output_dir: str,
    model,
    variables,
    *,
    model_name: Optional[str] = None,
    batch_size: int = 64,
    parallel: str = "sharded",
    outputs: Sequence[str] = ("pooled",),
    workers: int = 2,
    backend: str = "thread",
    resume: bool = False,
    shard_size: int = 4096,
    progress: bool = True,
    data_config: Optional[Dict[str, Any]] = None,
    micro_batch: Any = "auto",
) -> Dict[str, Any]:
    """Run `model` over every image of `src` and write features to `output_dir`. Returns a summary.

    batch_size is global (all devices of all processes). outputs: any of 'pooled' (B, D), 'tokens'
    (B, 1+N, D), 'logits' (B, classes). shard_size: rows per shard file per process (rounded down
    to whole local batches). micro_batch: rows per device step chunk ('auto': 8 on CPU, whole
    batch on accelerators; see model.chunked). Unreadable inputs are recorded and skipped; the
    run still succeeds.
    """
    t_start = time.perf_counter()
    outputs = tuple(dict.fromkeys(outputs))
    bad = [o for o in outputs if o not in OUTPUTS]
    if bad or not outputs:
        raise ValueError(f"outputs must be among {OUTPUTS} (got {list(outputs)})")
    cfg = data_config or resolve_data_config(model)
    transform = EvalTransform(cfg["input_size"], cfg["interpolation"], cfg["mean"], cfg["std"], cfg["crop_pct"],
                              cfg.get("crop_mode", "center"))
    refs = list_images(src)
    dp = par.DataParallel(make_forward(model, outputs, cfg["mean"], cfg["std"]), mode=parallel,
                          micro_batch=default_micro_batch() if micro_batch == "auto" else micro_batch)
    local_batch = dp.local_batch_size(batch_size)
    plan = Plan(len(refs), dp.process_index, dp.process_count, local_batch, max(1, shard_size // local_batch))

    os.makedirs(output_dir, exist_ok=True)
    for name in os.listdir(output_dir):  # leftovers of a killed writer
        if ".tmp-" in name:
            try:
                os.remove(os.path.join(output_dir, name))
            except FileNotFoundError:
                pass
    manifest = {
        "format": "beit-jax/features-v1",
        # canonical arch.tag, so CLI ('beit_base_patch16_224') and API runs of one model agree
        "model": model.pretrained_cfg.name if model.pretrained_cfg else (model_name or "Beit"),
        "weights_sha256": weights_fingerprint(variables),
        "outputs": list(outputs),
        "dtype": jnp.dtype(model.dtype).name,
        "img_size": model.img_size,
        "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
        "num_inputs": len(refs),
        "inputs_sha256": _inputs_fingerprint(refs),
        "process_count": plan.process_count,
        "local_batch_size": local_batch,
        "global_batch_size": batch_size,
        "rows_per_shard": plan.rows_per_shard,
        "num_shards_per_process": plan.num_shards,
        "parallel": parallel,
    }
    par.sync("beit-jax-extract-start")
    _check_or_write_manifest(output_dir, manifest, resume)
    par.sync("beit-jax-manifest")

    done = np.array([os.path.exists(os.path.join(output_dir, shard_name(s, plan.process_index, plan.process_count)))
                     for s in range(plan.num_shards)], dtype=bool)
    done = par.all_processes_agree(done)
    todo = [s for s in range(plan.num_shards) if not done[s]]
    slots_by_shard = {s: plan.shard_slots(s) for s in todo}
    todo_rows = sum(sum(1 for i in sl if i >= 0) for sl in slots_by_shard.values())

    params = dp.replicate(cast_for_inference(model, variables))
    image_shape = (transform.size[0], transform.size[1], 3)
    stats = dict(decode_wait_s=0.0, device_wait_s=0.0, write_s=0.0, rows=0, failed=0)
    bar = None
    if progress and plan.process_index == 0:
        from tqdm.auto import tqdm
        bar = tqdm(total=todo_rows, unit="img", desc=f"extract ({dp.num_devices} devices, {parallel})",
                   dynamic_ncols=True, file=sys.stderr)

    all_slots = [i for s in todo for i in slots_by_shard[s]]
    steps_per_shard = {s: len(slots_by_shard[s]) // local_batch for s in todo}
    shard_of_step = [s for s in todo for _ in range(steps_per_shard[s])]
    acc: Dict[str, list] = {}

    def finish_step(step: int, hb, out) -> None:
        t0 = time.perf_counter()
        rows = dp.fetch(out)
        stats["device_wait_s"] += time.perf_counter() - t0
        s = shard_of_step[step]
        a = acc.setdefault(s, dict(ids=[], errors=[], **{o: [] for o in outputs}))
        a["ids"].append(hb.indices[hb.valid])
        for o in outputs:
            a[o].append(rows[o][hb.valid])
        a["errors"].extend(hb.errors)
        stats["rows"] += int(hb.valid.sum())
        stats["failed"] += len(hb.errors)
        if step == 0:  # compile and warm-up end here: steady-state throughput counts from now
            stats["t_first"], stats["rows_first"] = time.perf_counter(), stats["rows"]
        if bar is not None:
            bar.update(int((hb.indices >= 0).sum()))
        if step + 1 == len(shard_of_step) or shard_of_step[step + 1] != s:
            t1 = time.perf_counter()
            _write_shard(output_dir, plan, s, acc.pop(s), refs, outputs, image_shape)
            stats["write_s"] += time.perf_counter() - t1

    with Decoder(transform, workers=workers, backend=backend, window=max(2 * local_batch, 16)) as decoder:
        stream = batches(refs, all_slots, local_batch, decoder, image_shape)
        pending = None
        step = 0
        while True:
            t0 = time.perf_counter()
            hb = next(stream, None)
            stats["decode_wait_s"] += time.perf_counter() - t0
            if hb is None:
                break
            out = dp(params, dp.put_batch(hb.images))  # async: the device works while we go on
            if pending is not None:
                finish_step(*pending)
            pending = (step, hb, out)
            step += 1
        if pending is not None:
            finish_step(*pending)
    if bar is not None:
        bar.close()

    par.sync("beit-jax-extract-done")
    if plan.process_index == 0:
        _finalize(output_dir, manifest)
    par.sync("beit-jax-finalized")
    t_end = time.perf_counter()
    elapsed = t_end - t_start
    steady_rows = stats["rows"] - stats.get("rows_first", 0)
    steady_s = t_end - stats.get("t_first", t_end)
    summary = dict(images=stats["rows"], failed=stats["failed"], seconds=elapsed,
                   images_per_sec=stats["rows"] / elapsed if elapsed > 0 else 0.0,
                   steady_images_per_sec=steady_rows / steady_s if steady_s > 0 else None,
                   decode_wait_s=stats["decode_wait_s"], device_wait_s=stats["device_wait_s"],
                   write_s=stats["write_s"], skipped_shards=int(done.sum()), shards=plan.num_shards,
                   devices=dp.num_devices, processes=dp.process_count, compiled_programs=dp.cache_size())
    return summary


def _write_shard(output_dir, plan: Plan, shard: int, a, refs, outputs, image_shape) -> None:
    ids = np.concatenate(a["ids"]) if a["ids"] else np.zeros((0,), np.int64)
    arrays = {"ids": ids.astype(np.int64), "paths": np.array([refs[i].id for i in ids], dtype=str)}
    for o in outputs:
        arrays[o] = np.concatenate(a[o]) if a[o] else np.zeros((0,), np.float32)
    failed = sorted(a["errors"])
    arrays["failed_ids"] = np.array([i for i, _ in failed], dtype=np.int64)
    arrays["failed_paths"] = np.array([refs[i].id for i, _ in failed], dtype=str)
    arrays["failed_errors"] = np.array([e for _, e in failed], dtype=str)
    atomic_write(os.path.join(output_dir, shard_name(shard, plan.process_index, plan.process_count)),
                 lambda f: np.savez(f, **arrays))


def _shard_files(output_dir: str) -> List[str]:
    return sorted(n for n in os.listdir(output_dir) if _SHARD_RE.match(n))


def _finalize(output_dir: str, manifest: Dict[str, Any]) -> None:
    failed, rows = [], 0
    for name in _shard_files(output_dir):
        with np.load(os.path.join(output_dir, name)) as z:
            rows += len(z["ids"])
            failed.extend(zip(z["failed_ids"].tolist(), z["failed_paths"].tolist(), z["failed_errors"].tolist()))
    failed.sort()
    atomic_write(os.path.join(output_dir, FAILED),
                 "".join(json.dumps({"path": p, "error": e}) + "\n" for _, p, e in failed))
    atomic_write(os.path.join(output_dir, MANIFEST),
                 json.dumps(dict(manifest, status="complete", rows=rows, failed=len(failed)), indent=2))


def read_features(output_dir: str, output: Optional[str] = None) -> Tuple[List[str], np.ndarray]:
    """(paths, features) of an extract run, in input order (failed inputs have no row).

    output: which array ('pooled', 'tokens', 'logits'); default: the run's first output.
    """
    with open(os.path.join(output_dir, MANIFEST)) as f:
        manifest = json.load(f)
    output = output or manifest["outputs"][0]
    if output not in manifest["outputs"]:
        raise ValueError(f"{output_dir} has outputs {manifest['outputs']}, not {output!r}")
    ids, paths, feats = [], [], []
    for name in _shard_files(output_dir):
        with np.load(os.path.join(output_dir, name)) as z:
            ids.append(z["ids"])
            paths.extend(z["paths"].tolist())
            feats.append(z[output])
    if not ids:
        return [], np.zeros((0,), np.float32)
    ids = np.concatenate(ids)
    order = np.argsort(ids, kind="stable")
    if len(np.unique(ids)) != len(ids):
        raise RuntimeError(f"{output_dir}: duplicate rows across shards (mixed runs?)")
    feats = np.concatenate(feats)[order]
    return [paths[i] for i in order], feats


def read_failures(output_dir: str) -> List[Dict[str, str]]:
    path = os.path.join(output_dir, FAILED)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
