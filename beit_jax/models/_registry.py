"""The registry every model family fills from its own file (timm's `_registry` / `_builder`).

A family file (`beit.py`, `beit3.py`) calls `register_family` once with its linen module, its
timm state-dict facts (`TimmFamily`), its architecture rows (`Architecture`: timm's
`@register_model` bodies) and its pretrained tags (`PretrainedCfg`: timm's `pretrained_cfg`).
Everything else (build_model, the key mapping, the Hub, create_model) reads these tables and
knows no family by name. Plain data apart from `build_model` / `init_variables`.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import re
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
BEIT_MEAN = BEIT_STD = (0.5, 0.5, 0.5)


# ---- pretrained tags --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PretrainedCfg:
    """Data config, Hub id and head size of one pretrained tag (None hub id: no published weights)."""
    architecture: str
    tag: str
    hf_hub_id: Optional[str]
    num_classes: int
    input_size: Tuple[int, int, int] = (3, 224, 224)
    crop_pct: float = 0.9
    interpolation: str = "bicubic"
    mean: Tuple[float, float, float] = BEIT_MEAN
    std: Tuple[float, float, float] = BEIT_STD
    crop_mode: str = "center"

    @property
    def name(self) -> str:
        return f"{self.architecture}.{self.tag}"

    @property
    def has_weights(self) -> bool:
        return self.hf_hub_id is not None


def pretrained_cfg(name: str, num_classes: int = 1000, input_size: Tuple[int, int, int] = (3, 224, 224),
                   crop_pct: float = 0.9, mean=BEIT_MEAN, std=BEIT_STD, hub: bool = True) -> PretrainedCfg:
    """The config of timm's 'arch.tag' (Hub id `timm/arch.tag` unless hub=False)."""
    arch, tag = name.split(".")
    return PretrainedCfg(architecture=arch, tag=tag, hf_hub_id=f"timm/{name}" if hub else None,
                         num_classes=num_classes, input_size=input_size, crop_pct=crop_pct,
                         interpolation="bicubic", mean=tuple(mean), std=tuple(std))


# ---- architecture rows ------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Architecture:
    """A registered architecture: the module class and its fields (timm's @register_model body).

    timm_name/timm_kwargs: the timm model that has the same parameters
    (`timm.create_model(timm_name, **timm_kwargs)`), for conversion checks.
    """
    module: type
    fields: Mapping[str, Any]
    timm_name: str
    timm_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)


# ---- what a family's timm state dict looks like ---------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ForeignLayout:
    """A checkpoint layout other than timm's that timm's checkpoint_filter_fn converts on load."""
    title: str
    detect: Callable[[Mapping[str, Any]], bool]
    convert: Callable[[Mapping[str, Any]], Dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class TimmFamily:
    """One model family's timm state dict: how to recognise it (`marker`, a key pattern only this
    family has), timm's key order (top level, "blocks." standing for every block, then inside a
    block), entries that carry no weights (buffers the model rebuilds; timm drops them too) and
    the foreign layouts timm converts for this family."""
    title: str
    module: type
    marker: re.Pattern
    order: Tuple[str, ...]
    block_order: Tuple[str, ...]
    ignored: Tuple[re.Pattern, ...] = ()
    foreign: Tuple[ForeignLayout, ...] = ()

    def sort_key(self, key: str):
        """Position of a timm key in timm's state_dict order (unknown keys last, by name)."""
        m = re.match(r"blocks\.(\d+)\.(.*)", key)
        if m:
            rest = m.group(2)
            pos = self.block_order.index(rest) if rest in self.block_order else len(self.block_order)
            return (self.order.index("blocks."), int(m.group(1)), pos, key)
        pos = self.order.index(key) if key in self.order else len(self.order)
        return (pos, 0, 0, key)

    def adapt(self, state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
        """The state dict in timm's layout: foreign layouts converted, weightless entries dropped."""
        for layout in self.foreign:
            if layout.detect(state_dict):
                state_dict = layout.convert(state_dict)
                break
        return {k: v for k, v in state_dict.items() if not any(r.search(k) for r in self.ignored)}


# ---- the tables -------------------------------------------------------------------------------
FAMILIES: List[TimmFamily] = []
ARCHITECTURES: Dict[str, Architecture] = {}
PRETRAINED_CFGS: Dict[str, PretrainedCfg] = {}  # in timm's order: an architecture's first tag is its default
DEFAULT_TAGS: Dict[str, str] = {}


def register_family(family: TimmFamily, architectures: Mapping[str, Architecture],
                    pretrained: Iterable[PretrainedCfg]) -> None:
    """Add one family's state-dict facts, architecture rows and tags (first tag per architecture
    = its default, as in timm). Names already registered, or tags of unknown architectures, raise."""
    pretrained = list(pretrained)
    taken = set(ARCHITECTURES) & set(architectures)
    if taken or any(c.name in PRETRAINED_CFGS for c in pretrained):
        raise ValueError(f"{family.title}: already registered: {sorted(taken) or [c.name for c in pretrained]}")
    orphans = [c.name for c in pretrained if c.architecture not in architectures]
    if orphans:
        raise ValueError(f"{family.title}: tags of unregistered architectures: {orphans}")
    FAMILIES.append(family)
    ARCHITECTURES.update(architectures)
    for cfg in pretrained:
        PRETRAINED_CFGS[cfg.name] = cfg
        DEFAULT_TAGS.setdefault(cfg.architecture, cfg.tag)


def split_model_name(name: str) -> Tuple[str, str]:
    """'arch' or 'arch.tag' -> (arch, tag), the tag defaulting as in timm. Unknown names raise."""
    arch, _, tag = name.partition(".")
    if arch not in DEFAULT_TAGS:
        close = fnmatch.filter(DEFAULT_TAGS, f"*{arch.split('_')[0]}*") or list(DEFAULT_TAGS)
        raise ValueError(f"unknown BEiT architecture {arch!r}; known: {', '.join(sorted(close))}")
    tag = tag or DEFAULT_TAGS[arch]
    if f"{arch}.{tag}" not in PRETRAINED_CFGS:
        tags = [c.tag for c in PRETRAINED_CFGS.values() if c.architecture == arch]
        raise ValueError(f"unknown tag {tag!r} for {arch}; known tags: {', '.join(tags)}")
    return arch, tag


def get_pretrained_cfg(name: str) -> PretrainedCfg:
    """The config of 'arch.tag' (or of the architecture's default tag)."""
    arch, tag = split_model_name(name)
    return PRETRAINED_CFGS[f"{arch}.{tag}"]


def list_models(pattern: str = "*", pretrained: bool = False) -> List[str]:
    """Names matching a glob, as `timm.list_models`: architectures, or 'arch.tag' with published
    weights when pretrained."""
    names = [c.name for c in PRETRAINED_CFGS.values() if c.has_weights] if pretrained else list(DEFAULT_TAGS)
    return sorted(n for n in names if fnmatch.fnmatch(n, pattern))


# ---- building ---------------------------------------------------------------------------------
def build_model(name: str, *, num_classes: Optional[int] = None, img_size: Optional[int] = None,
                global_pool: Optional[str] = None, drop_path_rate: float = 0.0,
                dtype=jnp.float32, param_dtype=jnp.float32, **kwargs):
    """The module for a registered 'arch' or 'arch.tag', without any weights.

    num_classes defaults to the tag's head; kwargs override any module field (depth=2, ...).
    """
    cfg = get_pretrained_cfg(name)
    arch = ARCHITECTURES[cfg.architecture]
    fields = dict(arch.fields)
    fields.update(num_classes=cfg.num_classes if num_classes is None else num_classes,
                  drop_path_rate=drop_path_rate, dtype=dtype, param_dtype=param_dtype,
                  pretrained_cfg=cfg)
    if img_size is not None:
        fields["img_size"] = int(img_size)
    if global_pool is not None:
        fields["global_pool"] = global_pool
    fields.update(kwargs)
    if fields["num_classes"] < 0:
        raise ValueError(f"num_classes must be 0 (no head) or more (got {fields['num_classes']})")
    size, patch = fields["img_size"], fields["patch_size"]
    if size <= 0 or size % patch:
        ok = max(patch, round(size / patch) * patch)
        raise ValueError(f"img_size {size} is not a positive multiple of the patch size {patch} "
                         f"(e.g. {ok}): images are cut into {patch}x{patch} patches")
    return arch.module(**fields)


# Fields that say how a model runs or trains, not which parameters it has: an export never records them.
RUNTIME_FIELDS = frozenset({"dtype", "param_dtype", "precision", "attn_impl", "micro_batch", "pretrained_cfg",
                            "drop_rate", "pos_drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate",
                            "parent", "name"})
# Recorded in an export under their own keys (create_model's own arguments).
_OWN_KEYS = frozenset({"num_classes", "img_size", "global_pool"})


def architecture_overrides(model) -> Dict[str, Any]:
    """The fields of `model` that differ from its registered architecture row (a depth=3 BEiT, a
    shared relative position bias, ...): what an export records so that it is rebuilt as it was."""
    arch = ARCHITECTURES[model.pretrained_cfg.architecture] if model.pretrained_cfg else None
    out = {}
    for f in dataclasses.fields(model):
        if f.name in RUNTIME_FIELDS or f.name in _OWN_KEYS or not f.init:
            continue
        want = arch.fields.get(f.name, f.default) if arch is not None else f.default
        value = getattr(model, f.name)
        if value != want:
            out[f.name] = value
    return out


def _dummy_input(model):
    return jax.ShapeDtypeStruct((1, model.img_size, model.img_size, model.in_chans), jnp.float32)


def prng_key(rng: int | jax.Array) -> jax.Array:
    """A JAX PRNG key from an int seed, or the key itself (the `rng=` of every init here)."""
    return jax.random.PRNGKey(rng) if isinstance(rng, int) else rng


def init_variables(model, rng: int | jax.Array = 0):
    """Random-init variables (timm's init scheme) for `model`, computed under jit."""
    key = prng_key(rng)
    return jax.jit(model.init)(key, jnp.zeros(_dummy_input(model).shape, jnp.float32))


def abstract_variables(model):
    """Shapes/dtypes of `model`'s variables without computing anything."""
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), _dummy_input(model))
