"""The train state (params, optimizer state, step, rng, EMA) and what a run keeps in its output
folder: its checkpoint, metrics, and the checks that refuse to mix runs in one output folder.

The output folder is a local path or any fsspec URL (s3://, gs://, ...): every file is written
whole (storage.write_whole: temp + rename locally, one PUT on a bucket), so the previous checkpoint
stays readable until the new one is complete."""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization
from flax.training import train_state

from .. import parallel as par
from ..storage import Folder, check_bucket, join_url, protocol_of, read_whole, url_exists, write_whole
from .optim import _params


# ---- the train state -------------------------------------------------------------------------
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


# ---- checkpoints --------------------------------------------------------------------------------
def save_checkpoint(path: str, state: TrainState, extra: Optional[Dict[str, Any]] = None) -> None:
    """Write the whole train state (params, optimizer, step, rng, EMA) + JSON-able extras to `path`
    (a local path or URL) whole: temp + rename locally, one PUT on a bucket."""
    host = jax.device_get(state)
    payload = {"state": serialization.to_state_dict(host), "extra": json.dumps(extra or {})}
    write_whole(path, serialization.msgpack_serialize(payload))


def read_checkpoint(path: str) -> Dict[str, Any]:
    """A checkpoint file as {'state': state dict, 'extra': the JSON extras}: check the extras (the
    run's settings) before `state_from_checkpoint` fits the state to this run's model."""
    payload = serialization.msgpack_restore(read_whole(path))
    return {"state": payload["state"], "extra": json.loads(payload["extra"])}


def state_from_checkpoint(payload: Dict[str, Any], template: TrainState, path: str = "the checkpoint") -> TrainState:
    try:
        return serialization.from_state_dict(jax.device_get(template), payload["state"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} does not fit this model and optimizer ({str(e).splitlines()[0][:300]}): it was "
                         f"written by another run; resume with that run's model and settings, or start a new "
                         f"`output_dir`") from e


def restore_checkpoint(path: str, template: TrainState) -> Tuple[TrainState, Dict[str, Any]]:
    payload = read_checkpoint(path)
    return state_from_checkpoint(payload, template, path), payload["extra"]


def _saved_step(path: str) -> int:
    return int(read_checkpoint(path)["extra"].get("step", 0))


def open_output(output_dir: str, resume: bool) -> None:
    """Before any work, on every process: process 0 checks the output folder (its bucket exists; a
    run there is continued only with resume) and makes it; all processes stop if it refuses."""
    refusal = ""
    if jax.process_index() == 0:
        check_bucket(output_dir)
        Folder(output_dir).makedirs()
        refusal = _check_output(output_dir, resume)
    if not par.all_processes_agree(np.array([not refusal]))[0]:
        raise ValueError(refusal or "process 0 refused the output folder (see its error)")


def _check_output(output_dir: str, resume: bool) -> str:
    """Why this output folder must not be written without resume ('' if it may)."""
    ours = [n for n in ("checkpoint.msgpack", "metrics.jsonl", "model.msgpack") if url_exists(join_url(output_dir, n))]
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


# Settings added after checkpoints were first written: what a checkpoint without them ran with.
SETTINGS_ADDED = {"mixup_mode": "batch"}


def _settings_mismatch(path: str, saved: Optional[Dict[str, Any]], now: Dict[str, Any]) -> str:
    """Why a resume with `now` settings would continue another run than the checkpoint's ('' if
    it would not)."""
    if not saved:
        return ""
    kinds = [("segmentation" if "scale_range" in d else "classification") for d in (saved, now)]
    if kinds[0] != kinds[1]:
        return (f"{path} belongs to a {kinds[0]} fine-tuning run, and this is {kinds[1]} fine-tuning: use another "
                f"`output_dir` (nothing was changed)")
    saved = _flat(dict({k: v for k, v in SETTINGS_ADDED.items() if k in now}, **saved))  # the settings this run has
    now = _flat(now)
    # a setting the checkpoint does not record (written before it was recorded) is not compared
    diff = [f"{k}: checkpoint {_short(saved.get(k))}, now {_short(now.get(k))}" for k in sorted(set(saved) | set(now))
            if k in saved and json.loads(json.dumps(saved.get(k))) != json.loads(json.dumps(now.get(k)))]
    if not diff:
        return ""
    return (f"{path} was written with other settings ({'; '.join(diff)}): resume with the same settings, "
            f"or start a new `output_dir`")


def _flat(d: Dict[str, Any]) -> Dict[str, Any]:
    """Settings with dict values (model, data, shards) as one entry per field: 'model.dtype'."""
    out: Dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            out[k] = v
    return out


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 200 else text[:200] + "..."


class MetricsLog:
    """A run's metrics.jsonl (or eval.jsonl), from `step` on: the lines past it (steps a killed run
    did after its last checkpoint) are dropped when it opens. Locally each record is appended at
    once (`tail -f` works); on a bucket, which has no appends, the file is rewritten whole at every
    `flush()` (the loop flushes with every checkpoint), so it always matches a checkpoint."""

    def __init__(self, url: str, step: int, write: bool = True):
        self.url, self.write = url, write
        self.local = protocol_of(url) in ("file", "local")
        self.lines: list = []
        if not write:
            return
        if url_exists(url):
            text = read_whole(url).decode()
            self.lines = [line + "\n" for line in text.splitlines() if line.strip() and json.loads(line)["step"] <= step]
        if self.local:
            write_whole(url, "".join(self.lines).encode())
            self.lines = []

    def add(self, record: Dict[str, Any]) -> None:
        if not self.write:
            return
        line = json.dumps(record) + "\n"
        if self.local:
            with open(self.url, "a") as f:
                f.write(line)
        else:
            self.lines.append(line)

    def flush(self) -> None:
        if self.write and not self.local:
            write_whole(self.url, "".join(self.lines).encode())
