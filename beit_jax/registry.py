"""Every timm BEiT architecture and pretrained tag, and `create_model` / `list_models`.

Architectures and tags mirror `timm/models/beit.py` (the first tag listed per architecture is
timm's default, as `timm.create_model('beit_base_patch16_224')` resolves it).
"""
from __future__ import annotations

import fnmatch
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp

from .model import Beit, PretrainedCfg

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)

_BASE = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
             use_abs_pos_emb=False, use_rel_pos_bias=True)
_LARGE = dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0,
              use_abs_pos_emb=False, use_rel_pos_bias=True)

# architecture -> Beit fields (timm's @register_model functions)
ARCHITECTURES: Dict[str, Dict[str, Any]] = {
    "beit_base_patch16_224": dict(_BASE, img_size=224, init_values=0.1),
    "beit_base_patch16_384": dict(_BASE, img_size=384, init_values=0.1),
    "beit_large_patch16_224": dict(_LARGE, img_size=224, init_values=1e-5),
    "beit_large_patch16_384": dict(_LARGE, img_size=384, init_values=1e-5),
    "beit_large_patch16_512": dict(_LARGE, img_size=512, init_values=1e-5),
    "beitv2_base_patch16_224": dict(_BASE, img_size=224, init_values=1e-5),
    "beitv2_large_patch16_224": dict(_LARGE, img_size=224, init_values=1e-5),
}


def _cfg(name: str, num_classes: int = 1000, input_size: Tuple[int, int, int] = (3, 224, 224),
         crop_pct: float = 0.9, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)) -> PretrainedCfg:
    arch, tag = name.split(".")
    return PretrainedCfg(architecture=arch, tag=tag, hf_hub_id=f"timm/{name}", num_classes=num_classes,
                         input_size=input_size, crop_pct=crop_pct, interpolation="bicubic",
                         mean=tuple(mean), std=tuple(std))


_V2 = dict(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)

# In timm's order: the first tag of an architecture is its default.
PRETRAINED_CFGS: Dict[str, PretrainedCfg] = {c.name: c for c in [
    _cfg("beit_base_patch16_224.in22k_ft_in22k_in1k"),
    _cfg("beit_base_patch16_384.in22k_ft_in22k_in1k", input_size=(3, 384, 384), crop_pct=1.0),
    _cfg("beit_base_patch16_224.in22k_ft_in22k", num_classes=21841),
    _cfg("beit_large_patch16_224.in22k_ft_in22k_in1k"),
    _cfg("beit_large_patch16_384.in22k_ft_in22k_in1k", input_size=(3, 384, 384), crop_pct=1.0),
    _cfg("beit_large_patch16_512.in22k_ft_in22k_in1k", input_size=(3, 512, 512), crop_pct=1.0),
    _cfg("beit_large_patch16_224.in22k_ft_in22k", num_classes=21841),
    _cfg("beitv2_base_patch16_224.in1k_ft_in22k_in1k", **_V2),
    _cfg("beitv2_base_patch16_224.in1k_ft_in1k", **_V2),
    _cfg("beitv2_base_patch16_224.in1k_ft_in22k", num_classes=21841, **_V2),
    _cfg("beitv2_large_patch16_224.in1k_ft_in22k_in1k", crop_pct=0.95, **_V2),
    _cfg("beitv2_large_patch16_224.in1k_ft_in1k", crop_pct=0.95, **_V2),
    _cfg("beitv2_large_patch16_224.in1k_ft_in22k", num_classes=21841, **_V2),
]}

DEFAULT_TAGS: Dict[str, str] = {}
for _c in PRETRAINED_CFGS.values():
    DEFAULT_TAGS.setdefault(_c.architecture, _c.tag)


def split_model_name(name: str) -> Tuple[str, str]:
    """'arch' or 'arch.tag' -> (arch, tag), the tag defaulting as in timm. Unknown names raise."""
    arch, _, tag = name.partition(".")
    if arch not in ARCHITECTURES:
        close = fnmatch.filter(ARCHITECTURES, f"*{arch.split('_')[0]}*") or list(ARCHITECTURES)
        raise ValueError(f"unknown BEiT architecture {arch!r}; known: {', '.join(sorted(close))}")
    tag = tag or DEFAULT_TAGS[arch]
    if f"{arch}.{tag}" not in PRETRAINED_CFGS:
        tags = [c.tag for c in PRETRAINED_CFGS.values() if c.architecture == arch]
        raise ValueError(f"unknown tag {tag!r} for {arch}; known tags: {', '.join(tags)}")
    return arch, tag


def get_pretrained_cfg(name: str) -> PretrainedCfg:
    arch, tag = split_model_name(name)
    return PRETRAINED_CFGS[f"{arch}.{tag}"]


def list_models(pattern: str = "*", pretrained: bool = False) -> list[str]:
    """Names matching a glob, as `timm.list_models`: architectures, or 'arch.tag' when pretrained."""
    names = list(PRETRAINED_CFGS) if pretrained else list(ARCHITECTURES)
    return sorted(n for n in names if fnmatch.fnmatch(n, pattern))


def build_model(name: str, *, num_classes: Optional[int] = None, img_size: Optional[int] = None,
                global_pool: Optional[str] = None, drop_path_rate: float = 0.0,
                dtype=jnp.float32, param_dtype=jnp.float32, **kwargs) -> Beit:
    """The `Beit` module for a registered name, without any weights."""
    cfg = get_pretrained_cfg(name)
    fields = dict(ARCHITECTURES[cfg.architecture])
    fields.update(num_classes=cfg.num_classes if num_classes is None else num_classes,
                  drop_path_rate=drop_path_rate, dtype=dtype, param_dtype=param_dtype,
                  pretrained_cfg=cfg)
    if img_size is not None:
        fields["img_size"] = int(img_size)
    if global_pool is not None:
        fields["global_pool"] = global_pool
    fields.update(kwargs)
    return Beit(**fields)


def init_variables(model: Beit, rng: int | jax.Array = 0):
    """Random-init variables (timm's init scheme) for `model`, computed under jit."""
    key = jax.random.PRNGKey(rng) if isinstance(rng, int) else rng
    dummy = jnp.zeros((1, model.img_size, model.img_size, model.in_chans), jnp.float32)
    return jax.jit(model.init)(key, dummy)


def abstract_variables(model: Beit):
    """Shapes/dtypes of `model`'s variables without computing anything."""
    dummy = jax.ShapeDtypeStruct((1, model.img_size, model.img_size, model.in_chans), jnp.float32)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), dummy)


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

    pretrained=True downloads the tag's timm `model.safetensors` from the Hugging Face Hub (its
    cache and HF_HUB_OFFLINE apply); checkpoint_path loads a local .safetensors/.pth/.bin timm
    state dict, or a beit-jax .msgpack export. Weights are resized for another img_size; a
    num_classes other than the checkpoint's starts a fresh head (seeded by rng).
    """
    from . import weights  # weights imports this module; keep the import one-way at load time

    saved = weights.read_checkpoint_config(checkpoint_path) if checkpoint_path else None
    if saved:  # a beit-jax export: its head size / resolution / pooling unless asked otherwise
        num_classes = saved.get("num_classes") if num_classes is None else num_classes
        img_size = saved.get("img_size") if img_size is None else img_size
        global_pool = saved.get("global_pool") if global_pool is None else global_pool
    model = build_model(name, num_classes=num_classes, img_size=img_size, global_pool=global_pool,
                        drop_path_rate=drop_path_rate, dtype=dtype, param_dtype=param_dtype, **kwargs)
    if checkpoint_path is None and not pretrained:
        return model, init_variables(model, rng)
    if checkpoint_path is None:
        checkpoint_path = weights.download_pretrained(model.pretrained_cfg)
    variables = weights.load_checkpoint(checkpoint_path, model, rng=rng)
    return model, variables

