"""Checkpoint files: timm state dicts (.safetensors, .pth/.bin) and beit-jax exports (.msgpack + .json).

Fourth stage of the loading stack, beside `hub.py`: bytes on disk <-> arrays, nothing about
architectures. .safetensors needs no torch; .pth/.bin are read with `torch.load(weights_only=True)`
(torch imported only then). Writes are atomic.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from ._io import atomic_write
from .mapping import to_numpy, unwrap_state_dict
from .models import architecture_overrides

FLAX_CHECKPOINT_SUFFIX = ".msgpack"
FLAX_CHECKPOINT_FORMAT = "beit-jax/flax-msgpack-v1"


def is_flax_checkpoint(path: str | os.PathLike) -> bool:
    return os.fspath(path).endswith(FLAX_CHECKPOINT_SUFFIX)


def load_state_dict_file(path: str | os.PathLike) -> Dict[str, np.ndarray]:
    """Read a timm checkpoint file into {key: numpy array}; nesting ({'model': ...}) is unwrapped."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".safetensors":
        return _load_safetensors(path)
    if ext in (".pth", ".bin", ".pt", ".ckpt"):
        return _load_torch_pickle(path)
    if ext == FLAX_CHECKPOINT_SUFFIX:
        raise ValueError(f"{path} is a beit-jax export, not a timm state dict: load it with "
                         f"beit_jax.create_model(NAME, checkpoint_path={path!r}), or turn it into a timm "
                         f"file with flax_to_timm")
    raise ValueError(f"{path}: unsupported checkpoint type {ext!r}; a timm state dict is .safetensors, .pth, "
                     f".bin, .pt or .ckpt (beit_jax.create_model also reads beit-jax {FLAX_CHECKPOINT_SUFFIX} exports)")


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
    return {k: to_numpy(v) for k, v in sd.items() if hasattr(v, "shape")}


# numpy dtype name -> safetensors dtype (bfloat16: ml_dtypes', which JAX brings)
_SAFETENSORS_DTYPES = {"bool": "BOOL", "uint8": "U8", "int8": "I8", "int16": "I16", "uint16": "U16", "float16": "F16",
                       "bfloat16": "BF16", "int32": "I32", "uint32": "U32", "float32": "F32", "float64": "F64",
                       "int64": "I64", "uint64": "U64"}


def save_safetensors(state_dict: Mapping[str, Any], path: str | os.PathLike,
                     metadata: Optional[Dict[str, str]] = None) -> None:
    """Write a state dict (numpy arrays, or anything np.asarray takes) as .safetensors atomically
    (temp file + rename).

    Streamed: the header, then each array's bytes straight from its buffer, so saving needs no
    second copy of the model in memory (safetensors.numpy.save builds the whole file as one bytes
    object from a bytes copy of every array: twice the model, seconds for a large one). The layout
    is the format's (8-byte little-endian header length, JSON header padded to 8 bytes, the tensors
    largest item size first, then by name, as safetensors orders them so each one is aligned)."""
    arrays = {}
    for k, v in state_dict.items():
        a = np.asarray(v, order="C")  # (not ascontiguousarray: it makes a 0-d array 1-d)
        if a.dtype.name not in _SAFETENSORS_DTYPES:
            raise ValueError(f"save_safetensors: {k} has dtype {a.dtype}, which .safetensors cannot store")
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        arrays[k] = a
    order = sorted(arrays, key=lambda k: (-arrays[k].dtype.itemsize, k))
    header: Dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for k in order:
        a = arrays[k]
        header[k] = {"dtype": _SAFETENSORS_DTYPES[a.dtype.name], "shape": list(a.shape),
                     "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)

    def write(f):
        f.write(len(head).to_bytes(8, "little") + head)
        for k in order:
            f.write(arrays[k].reshape(-1).view(np.uint8).data)

    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))), exist_ok=True)
    atomic_write(path, write)


def model_config_dict(model) -> Dict[str, Any]:
    """The JSON config stored beside a beit-jax checkpoint: the tag, head, resolution, pooling and
    every field that differs from the registered architecture (`overrides`, applied on load)."""
    return {
        "model": model.pretrained_cfg.name if model.pretrained_cfg else None,
        "num_classes": model.num_classes,
        "img_size": model.img_size,
        "global_pool": model.global_pool,
        "embed_dim": model.embed_dim,
        "depth": model.depth,
        "overrides": architecture_overrides(model),
        "format": FLAX_CHECKPOINT_FORMAT,
    }


def export_paths(path: str | os.PathLike) -> Tuple[str, str]:
    """(msgpack path, json path) an export to `path` writes, refusing what it must not overwrite:
    a folder, or existing files that are not a beit-jax export (a user's notes.json beside it)."""
    path = os.fspath(path)
    if not os.path.basename(path) or os.path.isdir(path):
        raise ValueError(f"save_flax_checkpoint: path {path!r} is a folder; give a file name such as "
                         f"{os.path.join(path, 'model' + FLAX_CHECKPOINT_SUFFIX)!r}")
    if not path.endswith(FLAX_CHECKPOINT_SUFFIX):
        path += FLAX_CHECKPOINT_SUFFIX
    json_path = path[: -len(FLAX_CHECKPOINT_SUFFIX)] + ".json"
    present = [p for p in (path, json_path) if os.path.exists(p)]
    try:
        ours = (read_checkpoint_config(path) or {}).get("format") == FLAX_CHECKPOINT_FORMAT
    except (ValueError, AttributeError, OSError):  # not JSON, not an object, unreadable: not ours
        ours = False
    if present and not ours:
        raise FileExistsError(f"{present[0]} exists and is not part of a beit-jax export ({json_path} with format "
                              f"{FLAX_CHECKPOINT_FORMAT}): it is not overwritten; choose another name")
    return path, json_path


def save_flax_checkpoint(variables: Mapping[str, Any], model, path: str | os.PathLike) -> Tuple[str, str]:
    """Write `path` (.msgpack, flax.serialization of the params) and `path` with .json (config).

    Both are written atomically; an earlier export at `path` is replaced, anything else there is
    refused (export_paths). Returns (msgpack_path, json_path).
    """
    import jax
    from flax import serialization

    path, json_path = export_paths(path)
    params = {"params": jax.tree_util.tree_map(np.asarray, variables["params"])}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, serialization.msgpack_serialize(params))
    atomic_write(json_path, json.dumps(model_config_dict(model), indent=2).encode())
    return path, json_path


def load_flax_checkpoint(path: str | os.PathLike) -> Dict[str, Any]:
    """Read a beit-jax .msgpack export as {'params': nested dict of numpy arrays}."""
    from flax import serialization

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
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
    if is_flax_checkpoint(path) and os.path.isfile(json_path):
        with open(json_path) as f:
            return json.load(f)
    return None
