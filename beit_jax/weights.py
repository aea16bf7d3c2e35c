"""timm state_dict <-> Flax variables (pure numpy), checkpoint files, and Hugging Face Hub download.

Mapping rule (both directions, derived from the model's own parameter tree, so it covers every
variant): Flax `blocks_3/attn/qkv/kernel` <-> timm `blocks.3.attn.qkv.weight`; Dense kernels are
transposed, the patch-embed conv kernel goes HWIO <-> OIHW, LayerNorm `scale` <-> `weight`.
torch is imported only to read .pth/.bin files.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np
from flax import traverse_util

from .model import Beit, PretrainedCfg, trunc_normal
from ._io import atomic_write
from .relpos import resample_abs_pos_embed, resize_rel_pos_bias_table

# Checkpoint entries that carry no weights: rebuilt by the model (timm drops them too).
IGNORED_KEY_PATTERNS = (re.compile(r"(^|\.)relative_position_index$"), re.compile(r"(^|\.)k_bias$"))
FLAX_CHECKPOINT_SUFFIX = ".msgpack"


class CheckpointMismatchError(ValueError):
    """A checkpoint that does not fit the model: nothing was loaded."""


# ---- naming -----------------------------------------------------------------------------------
def flax_path_to_timm_key(path: Tuple[str, ...]) -> str:
    parts = []
    for p in path:
        m = re.fullmatch(r"blocks_(\d+)", p)
        parts.append(f"blocks.{m.group(1)}" if m else p)
    if parts[-1] in ("kernel", "scale"):
        parts[-1] = "weight"
    return ".".join(parts)


def _to_timm_layout(path: Tuple[str, ...], value: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel":
        if value.ndim == 2:  # Dense (in, out) -> Linear (out, in)
            return np.ascontiguousarray(value.T)
        if value.ndim == 4:  # Conv HWIO -> OIHW
            return np.ascontiguousarray(value.transpose(3, 2, 0, 1))
    return value


def _to_flax_layout(path: Tuple[str, ...], value: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel":
        if value.ndim == 2:
            return np.ascontiguousarray(value.T)
        if value.ndim == 4:  # OIHW -> HWIO
            return np.ascontiguousarray(value.transpose(2, 3, 1, 0))
    return value


def _expected_params(model: Beit) -> Dict[Tuple[str, ...], Any]:
    from .registry import abstract_variables

    return traverse_util.flatten_dict(abstract_variables(model)["params"])


def _to_numpy(value) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach"):  # a torch tensor (only when the caller already has torch)
        value = value.detach().cpu()
        if not value.dtype.is_floating_point or value.dtype.itemsize >= 4:
            return value.numpy()
        return value.float().numpy()
    return np.asarray(value)


def unwrap_state_dict(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    """timm accepts {'model': sd}, {'module': sd} and {'state_dict': sd} nestings (and 'module.' prefixes)."""
    for key in ("model", "module", "state_dict", "model_ema"):
        if key in state_dict and isinstance(state_dict[key], Mapping):
            state_dict = state_dict[key]
            break
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def describe_checkpoint(state_dict: Mapping[str, Any]) -> str:
    """One line guessing the architecture a timm BEiT state dict belongs to (for error messages)."""
    try:
        dim = int(np.shape(state_dict["cls_token"])[-1])
        depth = 1 + max(int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k)))
    except (KeyError, ValueError):
        return "it does not look like a timm BEiT state dict (no cls_token / blocks.N.* keys)"
    size = {(768, 12): "base", (1024, 24): "large"}.get((dim, depth), "unknown size")
    desc = f"the checkpoint has embed_dim={dim}, depth={depth} ({size})"
    if "head.weight" in state_dict:
        desc += f", {np.shape(state_dict['head.weight'])[0]} classes"
    table = next((k for k in state_dict if k.endswith("relative_position_bias_table")), None)
    grid = None
    if table is not None:
        grid = (int((np.shape(state_dict[table])[0] - 3) ** 0.5) + 1) // 2
        desc += f", a {grid}x{grid} patch grid"
    from .registry import ARCHITECTURES

    fits = [a for a, f in ARCHITECTURES.items() if f["embed_dim"] == dim and f["depth"] == depth
            and (grid is None or f["img_size"] // f["patch_size"] == grid)]
    if fits:
        desc += f"; it fits {' or '.join(fits)}"
    return desc


# ---- timm -> flax -------------------------------------------------------------------------------
def convert_timm_state_dict(state_dict: Mapping[str, Any], model: Beit, *, resize: bool = True,
                            allow_missing_head: bool = False) -> Dict[str, Any]:
    """timm BEiT state dict -> Flax variables `{'params': ...}` with numpy leaves for `model`.

    Relative position tables (and absolute position embeddings) of another grid are resized as
    timm's checkpoint_filter_fn does when `resize`. Anything else that does not fit raises
    CheckpointMismatchError listing every missing/unexpected key and shape mismatch; nothing is
    loaded partially. allow_missing_head: tolerate a checkpoint whose head is absent (the caller
    then supplies one).
    """
    state_dict = unwrap_state_dict(state_dict)
    expected = _expected_params(model)
    by_key = {flax_path_to_timm_key(p): p for p in expected}
    sd = {k: v for k, v in state_dict.items() if not any(r.search(k) for r in IGNORED_KEY_PATTERNS)}

    missing = [k for k in by_key if k not in sd]
    if allow_missing_head:
        missing = [k for k in missing if not k.startswith("head.")]
    unexpected = [k for k in sd if k not in by_key]
    mismatched, params = [], {}
    for key, path in sorted(by_key.items(), key=lambda kv: _timm_order(kv[0])):
        if key not in sd:
            continue
        value = _to_flax_layout(path, _to_numpy(sd[key]))
        want = tuple(expected[path].shape)
        if value.shape != want and resize:
            if key.endswith("relative_position_bias_table") and value.ndim == 2 and value.shape[1] == want[1]:
                value = resize_rel_pos_bias_table(value, model.grid_size)
            elif key == "pos_embed" and value.ndim == 3 and value.shape[2] == want[2]:
                value = resample_abs_pos_embed(value, model.grid_size, num_prefix_tokens=1)
        if value.shape != want:
            mismatched.append(f"{key}: checkpoint {tuple(np.shape(sd[key]))} -> model expects "
                              f"{tuple(_to_timm_layout(path, np.empty(want, np.int8)).shape)}")
            continue
        params[path] = value.astype(expected[path].dtype)
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(_mismatch_message(model, state_dict, missing, unexpected, mismatched))
    return {"params": traverse_util.unflatten_dict(params)}


def _model_summary(model: Beit) -> str:
    name = model.pretrained_cfg.name if model.pretrained_cfg else "Beit"
    return (f"{name} (embed_dim={model.embed_dim}, depth={model.depth}, img_size={model.img_size}, "
            f"num_classes={model.num_classes})")


def _mismatch_message(model, state_dict, missing, unexpected, mismatched) -> str:
    def listing(title, items):
        if not items:
            return ""
        shown = "\n    ".join(items[:20])
        more = f"\n    ... and {len(items) - 20} more" if len(items) > 20 else ""
        return f"\n  {title} ({len(items)}):\n    {shown}{more}"

    return (f"checkpoint does not fit {_model_summary(model)}; nothing was loaded."
            + listing("shape mismatches", mismatched)
            + listing("missing keys", missing)
            + listing("unexpected keys", unexpected)
            + f"\n  Hint: {describe_checkpoint(state_dict)}. Pick the matching architecture "
              f"(beit_jax.list_models()), and pass num_classes= for a different head.")


# ---- flax -> timm -------------------------------------------------------------------------------
def to_timm_state_dict(variables: Mapping[str, Any], model: Optional[Beit] = None) -> Dict[str, np.ndarray]:
    """Flax variables -> timm state dict (numpy, float as stored). `timm.Beit.load_state_dict` takes it.

    model, when given, is checked against the variables' structure first.
    """
    params = variables["params"] if "params" in variables else variables
    flat = traverse_util.flatten_dict(dict(params))
    if model is not None:
        expected = _expected_params(model)
        if set(expected) != set(flat):
            extra = sorted("/".join(p) for p in set(flat) - set(expected))
            lack = sorted("/".join(p) for p in set(expected) - set(flat))
            raise CheckpointMismatchError(
                f"variables do not fit {_model_summary(model)}: unexpected {extra[:10]}, missing {lack[:10]}")
    out = {}
    for path, value in flat.items():
        out[flax_path_to_timm_key(path)] = _to_timm_layout(path, np.asarray(value))
    return dict(sorted(out.items(), key=lambda kv: _timm_order(kv[0])))


# timm's state_dict order (parameters in module registration order), for tidy exports.
_TIMM_ORDER = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
               "rel_pos_bias.relative_position_bias_table", "blocks.", "norm.weight", "norm.bias",
               "fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"]
_TIMM_BLOCK_ORDER = ["gamma_1", "gamma_2", "norm1.weight", "norm1.bias", "attn.q_bias", "attn.v_bias",
                     "attn.relative_position_bias_table", "attn.qkv.weight", "attn.proj.weight",
                     "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                     "mlp.fc2.weight", "mlp.fc2.bias"]


def _timm_order(key: str):
    m = re.match(r"blocks\.(\d+)\.(.*)", key)
    if m:
        rest = m.group(2)
        pos = _TIMM_BLOCK_ORDER.index(rest) if rest in _TIMM_BLOCK_ORDER else len(_TIMM_BLOCK_ORDER)
        return (_TIMM_ORDER.index("blocks."), int(m.group(1)), pos, key)
    pos = _TIMM_ORDER.index(key) if key in _TIMM_ORDER else len(_TIMM_ORDER)
    return (pos, 0, 0, key)


# ---- files --------------------------------------------------------------------------------------
def load_state_dict_file(path: str | os.PathLike) -> Dict[str, np.ndarray]:
    """Read a timm checkpoint file into {key: numpy array}.

    .safetensors needs no torch. .pth/.bin/.pt are read with `torch.load(weights_only=True)` (torch
    must be installed; pickles that carry code are refused by torch). Nesting is unwrapped.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".safetensors":
        return _load_safetensors(path)
    if ext in (".pth", ".bin", ".pt", ".ckpt"):
        return _load_torch_pickle(path)
    raise ValueError(f"{path}: unsupported checkpoint type {ext!r}; use .safetensors, .pth, .bin "
                     f"or a beit-jax {FLAX_CHECKPOINT_SUFFIX} export")


def _load_safetensors(path: str) -> Dict[str, np.ndarray]:
    from safetensors import SafetensorError, safe_open

    out = {}
    try:
        with safe_open(path, framework="numpy") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e}); the download or copy may be "
                         f"truncated, fetch it again") from e
    except TypeError:  # bfloat16 tensors: numpy has no such dtype, read through flax/jax
        with safe_open(path, framework="flax") as f:
            out = {k: np.asarray(f.get_tensor(k), dtype=np.float32) for k in f.keys()}
    return out


def _load_torch_pickle(path: str) -> Dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"{path}: reading .pth/.bin checkpoints needs torch "
                          f"(pip install 'beit-jax[convert]'), or convert it to .safetensors") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        raise ValueError(f"{path}: refused or unreadable as a weights-only torch checkpoint: "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. Only plain "
                         f"tensors are loaded (weights_only=True); a truncated file or a pickle "
                         f"carrying code ends here") from e
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state dict (mapping of name -> tensor), got {type(obj).__name__}")
    sd = unwrap_state_dict(obj)
    return {k: _to_numpy(v) for k, v in sd.items() if hasattr(v, "shape")}


def save_safetensors(state_dict: Mapping[str, np.ndarray], path: str | os.PathLike,
                     metadata: Optional[Dict[str, str]] = None) -> None:
    """Write a state dict as .safetensors atomically (temp file + rename)."""
    from safetensors.numpy import save

    atomic_write(path, save({k: np.ascontiguousarray(v) for k, v in state_dict.items()},
                            metadata=metadata or {"format": "pt"}))


def model_config_dict(model: Beit) -> Dict[str, Any]:
    """The JSON config stored beside a beit-jax checkpoint."""
    return {
        "model": model.pretrained_cfg.name if model.pretrained_cfg else None,
        "num_classes": model.num_classes,
        "img_size": model.img_size,
        "global_pool": model.global_pool,
        "embed_dim": model.embed_dim,
        "depth": model.depth,
        "format": "beit-jax/flax-msgpack-v1",
    }


def save_flax_checkpoint(variables: Mapping[str, Any], model: Beit, path: str | os.PathLike) -> Tuple[str, str]:
    """Write `path` (.msgpack, flax.serialization of the params) and `path` with .json (config).

    Both are written atomically. Returns (msgpack_path, json_path).
    """
    from flax import serialization

    path = os.fspath(path)
    if not path.endswith(FLAX_CHECKPOINT_SUFFIX):
        path += FLAX_CHECKPOINT_SUFFIX
    params = {"params": _numpy_tree(variables["params"])}
    json_path = path[: -len(FLAX_CHECKPOINT_SUFFIX)] + ".json"
    atomic_write(path, serialization.msgpack_serialize(params))
    atomic_write(json_path, json.dumps(model_config_dict(model), indent=2).encode())
    return path, json_path


def _numpy_tree(tree):
    import jax

    return jax.tree_util.tree_map(lambda a: np.asarray(a), tree)


def load_flax_checkpoint(path: str | os.PathLike, model: Beit) -> Dict[str, Any]:
    """Read a beit-jax .msgpack export as {'params': ...} (numpy leaves). `model` is accepted for API
    symmetry; `load_checkpoint` is what checks the tree against a model (through the timm mapping)."""
    from flax import serialization

    path = os.fspath(path)
    with open(path, "rb") as f:
        try:
            tree = serialization.msgpack_restore(f.read())
        except Exception as e:
            raise ValueError(f"{path}: not a readable beit-jax msgpack checkpoint ({e})") from e
    return {"params": tree["params"] if "params" in tree else tree}


def read_checkpoint_config(path: str | os.PathLike) -> Optional[Dict[str, Any]]:
    """The JSON config beside a beit-jax .msgpack checkpoint, if present."""
    path = os.fspath(path)
    json_path = os.path.splitext(path)[0] + ".json"
    if path.endswith(FLAX_CHECKPOINT_SUFFIX) and os.path.isfile(json_path):
        with open(json_path) as f:
            return json.load(f)
    return None


def load_checkpoint(path: str | os.PathLike, model: Beit, rng: Any = 0) -> Dict[str, Any]:
    """Variables for `model` from a checkpoint file (timm state dict or beit-jax .msgpack).

    A head of another size than `model.num_classes` is replaced by a fresh one (seeded by rng);
    num_classes=0 drops it. Everything else must fit (CheckpointMismatchError otherwise).
    """
    import jax

    path = os.fspath(path)
    if path.endswith(FLAX_CHECKPOINT_SUFFIX):
        sd = to_timm_state_dict(load_flax_checkpoint(path, model))
    else:
        sd = load_state_dict_file(path)
    sd = dict(unwrap_state_dict(sd))
    head_w = sd.get("head.weight")
    fresh_head = False
    if model.num_classes == 0 or (head_w is not None and np.shape(head_w)[0] != model.num_classes):
        sd.pop("head.weight", None)
        sd.pop("head.bias", None)
        fresh_head = model.num_classes > 0
    variables = convert_timm_state_dict(sd, model, allow_missing_head=fresh_head)
    if fresh_head:
        variables["params"]["head"] = init_head(model, rng)
    return jax.device_put(variables)


def init_head(model: Beit, rng: Any = 0) -> Dict[str, np.ndarray]:
    """A new classifier head initialised like timm's (trunc normal .02 * head_init_scale, zero bias)."""
    import jax

    key = jax.random.PRNGKey(rng) if isinstance(rng, int) else rng
    key = jax.random.fold_in(key, 0x4EAD)
    kernel = trunc_normal(0.02, model.head_init_scale)(key, (model.embed_dim, model.num_classes))
    return {"kernel": np.asarray(kernel, dtype=model.param_dtype),
            "bias": np.zeros((model.num_classes,), dtype=model.param_dtype)}


# ---- Hugging Face Hub ---------------------------------------------------------------------------
def download_pretrained(cfg: PretrainedCfg, filename: str = "model.safetensors") -> str:
    """Path of the tag's timm weights in the HF cache, downloading them if needed.

    Goes through `huggingface_hub.hf_hub_download`, so HF_HOME / HF_HUB_CACHE and HF_HUB_OFFLINE
    apply exactly as for timm itself.
    """
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_id=cfg.hf_hub_id, filename=filename)
    except Exception as e:
        raise PretrainedUnavailableError(
            f"could not get {filename} of {cfg.hf_hub_id} from the Hugging Face Hub or its cache "
            f"({type(e).__name__}: {e}). Either connect to the Hub once (the file is then cached "
            f"under HF_HOME), copy a timm checkpoint here and pass checkpoint_path= (CLI: "
            f"--checkpoint FILE), or point HF_HOME/HF_HUB_CACHE at a cache that holds it.") from e


class PretrainedUnavailableError(RuntimeError):
    """Pretrained weights are neither reachable on the Hub nor in the local cache."""
