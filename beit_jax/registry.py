"""The architecture table: each timm BEiT / BEiT-3 architecture name -> the Flax module and its fields.

Second stage of the loading stack: it knows model classes and pretrained configs, nothing about
files or the Hub. `build_model` makes a module without weights; `init_variables` /
`abstract_variables` give its random-init variables or just their shapes.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Optional, Union

import jax
import jax.numpy as jnp

from .beit3 import Beit3
from .model import Beit
from .pretrained import get_pretrained_cfg, list_models, split_model_name  # noqa: F401  (re-exported)

_BASE = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
             use_abs_pos_emb=False, use_rel_pos_bias=True)
_LARGE = dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0,
              use_abs_pos_emb=False, use_rel_pos_bias=True)
_TEST = dict(patch_size=16, embed_dim=64, depth=2, num_heads=2, mlp_ratio=4.0,
             use_abs_pos_emb=False, use_rel_pos_bias=True)
_BEIT3_BASE = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0)
_BEIT3_LARGE = dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0)
_BEIT3_GIANT = dict(patch_size=14, embed_dim=1408, depth=40, num_heads=16, mlp_ratio=4.3637)
_TINY = dict(img_size=64, embed_dim=64, depth=2, num_heads=2)


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


def _beit(name: str, **fields) -> Architecture:
    return Architecture(Beit, fields, name)


def _beit3(name: str, **fields) -> Architecture:
    return Architecture(Beit3, fields, name)


ARCHITECTURES: Dict[str, Architecture] = {
    "beit_base_patch16_224": _beit("beit_base_patch16_224", **_BASE, img_size=224, init_values=0.1),
    "beit_base_patch16_384": _beit("beit_base_patch16_384", **_BASE, img_size=384, init_values=0.1),
    "beit_large_patch16_224": _beit("beit_large_patch16_224", **_LARGE, img_size=224, init_values=1e-5),
    "beit_large_patch16_384": _beit("beit_large_patch16_384", **_LARGE, img_size=384, init_values=1e-5),
    "beit_large_patch16_512": _beit("beit_large_patch16_512", **_LARGE, img_size=512, init_values=1e-5),
    "beitv2_base_patch16_224": _beit("beitv2_base_patch16_224", **_BASE, img_size=224, init_values=1e-5),
    "beitv2_large_patch16_224": _beit("beitv2_large_patch16_224", **_LARGE, img_size=224, init_values=1e-5),
    "beit3_base_patch16_224": _beit3("beit3_base_patch16_224", **_BEIT3_BASE, img_size=224),
    "beit3_large_patch16_224": _beit3("beit3_large_patch16_224", **_BEIT3_LARGE, img_size=224),
    "beit3_giant_patch14_224": _beit3("beit3_giant_patch14_224", **_BEIT3_GIANT, img_size=224),
    "beit3_giant_patch14_336": _beit3("beit3_giant_patch14_336", **_BEIT3_GIANT, img_size=336),
    "test_beit": Architecture(Beit, dict(_TEST, img_size=64, init_values=0.1), "beit_base_patch16_224",
                              dict(_TINY, init_values=0.1)),
    "test_beit3": Architecture(Beit3, dict(_BEIT3_BASE, **_TINY), "beit3_base_patch16_224", _TINY),
}


def build_model(name: str, *, num_classes: Optional[int] = None, img_size: Optional[int] = None,
                global_pool: Optional[str] = None, drop_path_rate: float = 0.0,
                dtype=jnp.float32, param_dtype=jnp.float32, **kwargs) -> Union[Beit, Beit3]:
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


def _dummy_input(model):
    return jax.ShapeDtypeStruct((1, model.img_size, model.img_size, model.in_chans), jnp.float32)


def init_variables(model, rng: int | jax.Array = 0):
    """Random-init variables (timm's init scheme) for `model`, computed under jit."""
    key = jax.random.PRNGKey(rng) if isinstance(rng, int) else rng
    return jax.jit(model.init)(key, jnp.zeros(_dummy_input(model).shape, jnp.float32))


def abstract_variables(model):
    """Shapes/dtypes of `model`'s variables without computing anything."""
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), _dummy_input(model))
