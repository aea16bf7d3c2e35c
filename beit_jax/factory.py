"""`create_model`: the top of the loading stack (timm's `_factory`).

pretrained cfgs -> architecture table (`registry`) -> key mapping (`mapping`) -> files / Hub
(`checkpoints`, `hub`) -> here. Nothing below imports this module.
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from . import checkpoints, hub, publish
from .layers import trunc_normal
from .mapping import Source, fit_params
from .models import get_pretrained_cfg, split_model_name
from .models import build_model, init_variables, prng_key


class NewHeadWarning(UserWarning):
    """The model got a fresh random head instead of the checkpoint's."""


def read_raw(path: str | os.PathLike) -> Tuple[str, Dict[str, Any]]:
    """('flax', params tree) for a beit-jax export, ('timm', state dict) for anything else."""
    if checkpoints.is_flax_checkpoint(path):
        return "flax", checkpoints.load_flax_checkpoint(path)["params"]
    return "timm", checkpoints.load_state_dict_file(path)


def checkpoint_num_classes(kind: str, raw: Dict[str, Any]) -> int:
    """The head size a checkpoint carries (0: no head)."""
    if kind == "flax":
        head = raw.get("head", {}).get("kernel") if isinstance(raw.get("head"), dict) else None
        return int(np.shape(head)[-1]) if head is not None else 0
    head = raw.get("head.weight")
    return int(np.shape(head)[0]) if head is not None else 0


def load_checkpoint(path: str | os.PathLike, model, rng: Any = 0, *, raw=None) -> Dict[str, Any]:
    """Variables for `model` from a checkpoint file (timm state dict or beit-jax .msgpack).

    A head of another size than `model.num_classes` is replaced by a fresh one (seeded by rng),
    with a warning; num_classes=0 drops it. Everything else must fit (CheckpointMismatchError
    otherwise), and every value must be finite.
    """
    kind, raw = raw or read_raw(path)
    source = Source.from_flax(raw, model) if kind == "flax" else Source.from_timm(raw, model)
    have = checkpoint_num_classes(kind, raw)
    fresh_head = model.num_classes != have
    if fresh_head:
        source.drop("head")
        if model.num_classes > 0:
            warnings.warn(f"{os.fspath(path)} has a {have}-class head; the model gets a NEW RANDOM "
                          f"{model.num_classes}-class head (fine-tune it before use). Leave num_classes unset "
                          f"to use the checkpoint's head.", NewHeadWarning, stacklevel=3)
    variables = fit_params(source, model, allow_missing=("head",) if fresh_head else (), origin=os.fspath(path))
    if fresh_head and model.num_classes > 0:
        variables["params"]["head"] = init_head(model, rng)
    return jax.device_put(variables)


def init_head(model, rng: Any = 0) -> Dict[str, np.ndarray]:
    """A new classifier head initialised like timm's (trunc normal .02 * head_init_scale, zero bias)."""
    key = prng_key(rng)
    key = jax.random.fold_in(key, 0x4EAD)
    kernel = trunc_normal(0.02, model.head_init_scale)(key, (model.embed_dim, model.num_classes))
    return {"kernel": np.asarray(kernel, dtype=model.param_dtype),
            "bias": np.zeros((model.num_classes,), dtype=model.param_dtype)}


def create_model(
    name: str,
    pretrained: bool = False,
    *,
    num_classes: Optional[int] = None,
    img_size: Optional[int] = None,
    global_pool: Optional[str] = None,
    drop_path_rate: float = 0.0,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    checkpoint_path: Optional[str] = None,
    rng: int | jax.Array = 0,
    **kwargs,
):
    """Build a BEiT and its variables: `(module, variables)`.

    name: a registered 'arch' or 'arch.tag', or a timm Hub folder ('local-dir:PATH', or PATH itself
    when it is a folder with a config.json: what `finetune.train` writes to OUTPUT/hub, or timm's
    save_for_hf): its config.json gives the architecture, head, size, pooling and data config, its
    model.safetensors the weights.

    pretrained=True downloads the tag's timm `model.safetensors` from the Hugging Face Hub (its
    cache and HF_HUB_OFFLINE apply); checkpoint_path loads a local .safetensors/.pth/.bin timm
    state dict, or a beit-jax .msgpack export (its architecture must match `name`). The head is the
    checkpoint's unless num_classes says otherwise: another size starts a fresh random head
    (seeded by rng) with a warning, 0 drops it. Weights are resized for another img_size. kwargs
    override module fields (depth=2, attn_impl=...).
    """
    folder = publish.hub_folder(name)
    if folder is not None:  # a timm Hub folder: its config.json decides, what is passed here wins
        if checkpoint_path is not None:
            raise ValueError(f"{name} is a model folder with its own weights: leave `checkpoint_path` unset")
        name, saved, checkpoint_path = publish.read_hub_folder(folder)
        own = {k: saved.pop(k, None) for k in ("num_classes", "img_size", "global_pool")}
        num_classes = own["num_classes"] if num_classes is None else num_classes
        img_size = own["img_size"] if img_size is None else img_size
        global_pool = own["global_pool"] if global_pool is None else global_pool
        kwargs = {**saved, **kwargs}
    build = dict(img_size=img_size, global_pool=global_pool, drop_path_rate=drop_path_rate, dtype=dtype,
                 param_dtype=param_dtype, **kwargs)
    if checkpoint_path is None and not pretrained:
        model = build_model(name, num_classes=num_classes, **build)
        return model, init_variables(model, rng)
    if checkpoint_path is None:
        checkpoint_path = hub.download_pretrained(get_pretrained_cfg(name))
    saved = checkpoints.read_checkpoint_config(checkpoint_path)
    if saved:  # a beit-jax export: its architecture, resolution and pooling unless asked otherwise
        name = _export_name(name, saved, checkpoint_path)
        build["img_size"] = saved.get("img_size") if img_size is None else img_size
        build["global_pool"] = saved.get("global_pool") if global_pool is None else global_pool
        build.update({k: v for k, v in _saved_overrides(saved).items() if k not in kwargs})
    raw = read_raw(checkpoint_path)
    if num_classes is None:  # the checkpoint decides its own head
        num_classes = checkpoint_num_classes(*raw)
    model = build_model(name, num_classes=num_classes, **build)
    return model, load_checkpoint(checkpoint_path, model, rng=rng, raw=raw)


def _saved_overrides(saved: Dict[str, Any]) -> Dict[str, Any]:
    """The fields an export was built with beyond its architecture row (`overrides`; older exports
    record only embed_dim and depth)."""
    out = {k: saved[k] for k in ("embed_dim", "depth") if k in saved}
    out.update(saved.get("overrides") or {})
    return out


def _export_name(name: str, saved: Dict[str, Any], path) -> str:
    """The model name to load a beit-jax export under: refuse another architecture (it would run
    with the wrong layers or the wrong mean/std); a bare architecture name takes the export's tag."""
    exported = saved.get("model")
    if not exported:
        return name
    arch, _ = split_model_name(name)
    exported_arch = exported.split(".")[0]
    if arch != exported_arch:
        raise ValueError(f"{os.fspath(path)} was exported from {exported}, not {name}: loading it as {arch} "
                         f"would run it with another architecture's layers or data config (mean/std, crop). "
                         f"Use `model={exported}` (create_model('{exported}', ...)).")
    return name if "." in name else exported
