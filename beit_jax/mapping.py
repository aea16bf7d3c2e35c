"""timm state dict <-> Flax variables, pure numpy, both directions.

Third stage of the loading stack (pretrained cfgs -> architecture table -> this -> files/Hub ->
create_model). The mapping is derived from the model's own parameter tree, so it covers every
variant: Flax `blocks_3/attn/qkv/kernel` <-> timm `blocks.3.attn.qkv.weight`; Dense kernels are
transposed, the patch-embed conv kernel goes HWIO <-> OIHW, LayerNorm `scale` <-> `weight`.

Both families (BEiT v1/v2 and BEiT-3) name their Flax modules as timm names them, so that one
rule derives every key; what differs between their timm state dicts (key order, entries that
carry no weights, foreign layouts timm's checkpoint_filter_fn accepts, how to recognise one) is
one `TimmFamily` each, registered with the family in `models/<family>.py`.

Every load ends in `fit_params`, which works on Flax paths whatever the source (a timm state
dict after renaming, or a beit-jax export as is): it resizes position tables for another grid
and refuses, listing everything, a checkpoint that does not fit. Nothing loads partially.
"""
from __future__ import annotations

import functools
import re
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

import numpy as np
from flax import traverse_util

from ._arrays import to_numpy, transposed_copy  # noqa: F401  (to_numpy re-exported)
from .models import ARCHITECTURES, FAMILIES, TimmFamily, abstract_variables
from .relpos import resample_abs_pos_embed, resize_rel_pos_bias_table

Path = Tuple[str, ...]


class CheckpointMismatchError(ValueError):
    """A checkpoint that does not fit the model: nothing was loaded."""


# ---- naming and layout ----------------------------------------------------------------------
def flax_path_to_timm_key(path: Path) -> str:
    parts = []
    for p in path:
        m = re.fullmatch(r"blocks_(\d+)", p)
        parts.append(f"blocks.{m.group(1)}" if m else p)
    if parts[-1] in ("kernel", "scale"):
        parts[-1] = "weight"
    return ".".join(parts)


def flax_path_name(path: Path) -> str:
    return "/".join(path)


def to_timm_layout(path: Path, value: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel":
        if value.ndim == 2:  # Dense (in, out) -> Linear (out, in)
            return transposed_copy(value)
        if value.ndim == 4:  # Conv HWIO -> OIHW
            return transposed_copy(value, (3, 2, 0, 1))
    return value


def to_flax_layout(path: Path, value: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel":
        if value.ndim == 2:
            return transposed_copy(value)
        if value.ndim == 4:  # OIHW -> HWIO
            return transposed_copy(value, (2, 3, 1, 0))
    return value


def _timm_shape(path: Path, shape: Tuple[int, ...]) -> Tuple[int, ...]:
    """The shape to_timm_layout gives an array of `shape` (without making one)."""
    if path[-1] == "kernel" and len(shape) == 2:
        return shape[1], shape[0]
    if path[-1] == "kernel" and len(shape) == 4:
        return shape[3], shape[2], shape[0], shape[1]
    return tuple(shape)


def expected_params(model) -> Dict[Path, Any]:
    """Flat {Flax path: ShapeDtypeStruct} of the model's parameters (a fresh dict per call)."""
    try:
        return dict(_expected_params(model))
    except TypeError:  # a field that does not hash (a list given by hand): trace it each time
        return _expected_params.__wrapped__(model)


@functools.lru_cache(maxsize=16)
def _expected_params(model) -> Dict[Path, Any]:
    # Tracing init costs seconds for the large models, and one load asks twice (the key map, then
    # the fit); linen modules are frozen dataclasses, equal exactly when every field is
    return traverse_util.flatten_dict(abstract_variables(model)["params"])


def unwrap_state_dict(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    """timm accepts {'model': sd}, {'module': sd} and {'state_dict': sd} nestings (and 'module.' prefixes)."""
    for key in ("model", "module", "state_dict", "model_ema"):
        if key in state_dict and isinstance(state_dict[key], Mapping):
            state_dict = state_dict[key]
            break
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


# ---- the families (each registered by its file in models/) --------------------------------------
def family_of(model) -> TimmFamily:
    """The family a model module belongs to."""
    for family in FAMILIES:
        if isinstance(model, family.module):
            return family
    raise TypeError(f"{type(model).__name__} is not a beit-jax model ({', '.join(f.module.__name__ for f in FAMILIES)})")


def recognise(state_dict: Mapping[str, Any]) -> Tuple[Optional[TimmFamily], Mapping[str, Any], str]:
    """(family or None, the state dict in timm's layout, the foreign layout's title or '')."""
    for family in FAMILIES:
        for layout in family.foreign:
            if layout.detect(state_dict):
                return family, layout.convert(state_dict), layout.title
    family = next((f for f in FAMILIES if any(f.marker.search(k) for k in state_dict)), None)
    return family, state_dict, ""


# ---- the common end of every load ---------------------------------------------------------------
class Source:
    """Checkpoint entries already in Flax paths and layout, plus how to name them for the user."""

    def __init__(self, params: Dict[Path, np.ndarray], unexpected: List[str], name: Callable[[Path], str],
                 shape_as_stored: Callable[[Path, Tuple[int, ...]], Tuple[int, ...]],
                 describe: Callable[[], str]):
        self.params, self.unexpected, self.name = params, unexpected, name
        self.shape_as_stored, self.describe = shape_as_stored, describe

    @classmethod
    def from_timm(cls, state_dict: Mapping[str, Any], model) -> "Source":
        original = unwrap_state_dict(state_dict)
        sd = family_of(model).adapt(original)
        by_key = {flax_path_to_timm_key(p): p for p in expected_params(model)}
        params = {}
        for k, v in sd.items():
            if k in by_key:
                v = to_numpy(v)
                params[by_key[k]] = _own_copy(to_flax_layout(by_key[k], v), v)
        return cls(params, [k for k in sd if k not in by_key], flax_path_to_timm_key, _timm_shape,
                   lambda: describe_checkpoint(original))

    @classmethod
    def from_flax(cls, params: Mapping[str, Any], model) -> "Source":
        flat = {p: np.array(v) for p, v in traverse_util.flatten_dict(dict(params)).items()}  # copies: see _own_copy
        expected = expected_params(model)
        return cls({p: v for p, v in flat.items() if p in expected},
                   [flax_path_name(p) for p in flat if p not in expected], flax_path_name,
                   lambda p, s: tuple(s),
                   lambda: describe_checkpoint({flax_path_to_timm_key(p): to_timm_layout(p, v)
                                                for p, v in flat.items()}))

    def drop(self, prefix: str) -> None:
        """Forget the entries of a top-level module (a head the caller replaces)."""
        self.params = {p: v for p, v in self.params.items() if p[0] != prefix}


def _own_copy(value: np.ndarray, original: np.ndarray) -> np.ndarray:
    """`value`, copied if it still shares memory with the caller's array (or the tensor it views):
    converted parameters never alias a state dict the caller may go on changing, and fit_params
    need not copy them again."""
    return value.copy() if np.may_share_memory(value, original) else value


def fit_params(source: Source, model, *, resize: bool = True, allow_missing: Iterable[str] = (),
               origin: str = "checkpoint") -> Dict[str, Any]:
    """{'params': tree} for `model` from `source`, or CheckpointMismatchError listing every
    missing/unexpected entry and shape mismatch. Relative position tables and absolute position
    embeddings of another grid are resized as timm's checkpoint_filter_fn does when `resize`.
    allow_missing: top-level modules the caller supplies itself (a fresh head)."""
    expected = expected_params(model)
    order = family_of(model).sort_key
    expected = {p: expected[p] for p in sorted(expected, key=lambda p: order(flax_path_to_timm_key(p)))}
    allow_missing = set(allow_missing)
    missing = [source.name(p) for p in expected if p not in source.params and p[0] not in allow_missing]
    mismatched, params = [], {}
    for path, want in expected.items():
        if path not in source.params:
            continue
        value = source.params[path]
        stored_shape = source.shape_as_stored(path, value.shape)
        want = tuple(want.shape)
        if value.shape != want and resize:
            if path[-1] == "relative_position_bias_table" and value.ndim == 2 and value.shape[1] == want[1]:
                value = resize_rel_pos_bias_table(value, model.grid_size)
            elif path == ("pos_embed",) and value.ndim == 3 and value.shape[2] == want[2]:
                value = resample_abs_pos_embed(value, model.grid_size, num_prefix_tokens=1)
        if value.shape != want:
            mismatched.append(f"{source.name(path)}: checkpoint {stored_shape} -> model expects "
                              f"{source.shape_as_stored(path, want)}")
            continue
        params[path] = value.astype(expected[path].dtype, copy=False)
    if missing or source.unexpected or mismatched:
        raise CheckpointMismatchError(_mismatch_message(model, source, missing, mismatched))
    bad = [f"{source.name(p)} ({int((~np.isfinite(v)).sum())} of {v.size})" for p, v in params.items()
           if np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all()]
    if bad:
        raise CheckpointMismatchError(f"{origin} holds NaN or Inf values in {len(bad)} tensors: "
                                      f"{', '.join(bad[:10])}; nothing was loaded. The file is damaged or "
                                      f"comes from a diverged run: use an earlier checkpoint.")
    return {"params": traverse_util.unflatten_dict(params)}


def _model_summary(model) -> str:
    name = model.pretrained_cfg.name if model.pretrained_cfg else type(model).__name__
    return (f"{name} (embed_dim={model.embed_dim}, depth={model.depth}, img_size={model.img_size}, "
            f"num_classes={model.num_classes})")


def _mismatch_message(model, source: Source, missing, mismatched) -> str:
    def listing(title, items):
        if not items:
            return ""
        shown = "\n    ".join(items[:20])
        more = f"\n    ... and {len(items) - 20} more" if len(items) > 20 else ""
        return f"\n  {title} ({len(items)}):\n    {shown}{more}"

    return (f"checkpoint does not fit {_model_summary(model)}; nothing was loaded."
            + listing("shape mismatches", mismatched)
            + listing("missing keys", missing)
            + listing("unexpected keys", source.unexpected)
            + f"\n  Hint: {source.describe()}. Pick the matching architecture "
              f"(beit_jax.list_models()), and pass num_classes= for a different head.")


_SIZES = {(768, 12): "base", (1024, 24): "large", (1408, 40): "giant"}


def describe_checkpoint(state_dict: Mapping[str, Any]) -> str:
    """One line guessing the architecture a timm BEiT / BEiT-3 state dict (or an original
    `beit3.*` one) belongs to, for error messages."""
    family, state_dict, layout = recognise(state_dict)
    try:
        dim = int(np.shape(state_dict["cls_token"])[-1])
        depth = 1 + max(int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k)))
    except (KeyError, ValueError):
        return "it does not look like a timm BEiT or BEiT-3 state dict (no cls_token / blocks.N.* keys)"
    kind = f"an {layout} checkpoint" if layout else (f"a {family.title} checkpoint" if family else "the checkpoint")
    desc = f"{kind} with embed_dim={dim}, depth={depth} ({_SIZES.get((dim, depth), 'unknown size')})"
    if "head.weight" in state_dict:
        desc += f", {np.shape(state_dict['head.weight'])[0]} classes"
    patch = np.shape(state_dict["patch_embed.proj.weight"])[-1] if "patch_embed.proj.weight" in state_dict else None
    table = next((k for k in state_dict if k.endswith("relative_position_bias_table")), None)
    grid = None
    if table is not None:
        grid = (int((np.shape(state_dict[table])[0] - 3) ** 0.5) + 1) // 2
    elif "pos_embed" in state_dict:
        grid = int((np.shape(state_dict["pos_embed"])[1] - 1) ** 0.5)
    if grid is not None:
        desc += f", a {grid}x{grid} grid of {patch or '?'}px patches"
    fits = [a for a, spec in ARCHITECTURES.items() if spec.fields["embed_dim"] == dim
            and spec.fields["depth"] == depth and (family is None or spec.module is family.module)
            and (patch is None or spec.fields["patch_size"] == patch)
            and (grid is None or spec.fields["img_size"] // spec.fields["patch_size"] == grid)]
    if fits:
        desc += f"; it fits {' or '.join(fits)}"
    return desc


# ---- public conversions -------------------------------------------------------------------------
def convert_timm_state_dict(state_dict: Mapping[str, Any], model, *, resize: bool = True,
                            allow_missing_head: bool = False) -> Dict[str, Any]:
    """timm BEiT / BEiT-3 state dict -> Flax variables `{'params': ...}` with numpy leaves for `model`.

    An original `beit3.*` checkpoint is remapped as timm's checkpoint_filter_fn does.

    Tables of another grid are resized when `resize`; anything else that does not fit raises
    CheckpointMismatchError listing every missing/unexpected key and shape mismatch.
    allow_missing_head: tolerate a checkpoint without a head (the caller then supplies one).
    """
    return fit_params(Source.from_timm(state_dict, model), model, resize=resize,
                      allow_missing=("head",) if allow_missing_head else ())


def to_timm_state_dict(variables: Mapping[str, Any], model: Optional[Any] = None) -> Dict[str, np.ndarray]:
    """Flax variables -> timm state dict (numpy, float as stored), in timm's key order.
    timm's model `load_state_dict(strict=True)` takes it. model, when given, is checked first."""
    params = variables["params"] if "params" in variables else variables
    flat = traverse_util.flatten_dict(dict(params))
    family = family_of(model) if model is not None else None
    if model is not None:
        expected = expected_params(model)
        if set(expected) != set(flat):
            extra = sorted(flax_path_name(p) for p in set(flat) - set(expected))
            lack = sorted(flax_path_name(p) for p in set(expected) - set(flat))
            raise CheckpointMismatchError(
                f"variables do not fit {_model_summary(model)}: unexpected {extra[:10]}, missing {lack[:10]}")
    out = {flax_path_to_timm_key(path): to_timm_layout(path, np.asarray(value)) for path, value in flat.items()}
    family = family or recognise(out)[0] or FAMILIES[0]
    return dict(sorted(out.items(), key=lambda kv: family.sort_key(kv[0])))
