"""The train state (params, optimizer state, step, rng, EMA) and what a run keeps on disk: its
checkpoint, metrics, and the checks that refuse to mix runs in one output folder."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
from flax import serialization
from flax.training import train_state

from .._io import atomic_write
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
    """Atomically write the whole train state (params, optimizer, step, rng, EMA) + JSON-able extras."""
    host = jax.device_get(state)
    payload = {"state": serialization.to_state_dict(host), "extra": json.dumps(extra or {})}
    atomic_write(path, serialization.msgpack_serialize(payload))


def restore_checkpoint(path: str, template: TrainState) -> Tuple[TrainState, Dict[str, Any]]:
    with open(path, "rb") as f:
        payload = serialization.msgpack_restore(f.read())
    state = serialization.from_state_dict(jax.device_get(template), payload["state"])
    return state, json.loads(payload["extra"])


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


# Settings added after checkpoints were first written: what a checkpoint without them ran with.
SETTINGS_ADDED = {"mixup_mode": "batch"}


def _settings_mismatch(path: str, saved: Optional[Dict[str, Any]], now: Dict[str, Any]) -> str:
    """Why a resume with `now` settings would continue another run than the checkpoint's ('' if
    it would not)."""
    if not saved:
        return ""
    saved = dict(SETTINGS_ADDED, **saved)
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
