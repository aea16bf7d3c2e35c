"""The model families, one file each, each registering itself (see `_registry.register_family`):

- `beit.py`: BEiT v1 / v2 (timm `timm/models/beit.py`)
- `beit3.py`: BEiT-3's vision tower (timm's `beit3_*` VisionTransformer)

`_base.py` holds the linen base they share (`ViTCommon`), `_registry.py` the tables they fill.
A new family is one new file here plus its import below (README "Layout").
"""
from ._registry import (ARCHITECTURES, DEFAULT_TAGS, FAMILIES, PRETRAINED_CFGS, Architecture, ForeignLayout,
                        PretrainedCfg, TimmFamily, abstract_variables, architecture_overrides, build_model, get_pretrained_cfg,
                        init_variables, list_models, pretrained_cfg, prng_key, register_family, split_model_name)
from ._base import ViTCommon, cast_for_inference
from .beit import Beit
from .beit3 import Beit3

__all__ = [
    "ARCHITECTURES", "DEFAULT_TAGS", "FAMILIES", "PRETRAINED_CFGS", "Architecture", "ForeignLayout", "architecture_overrides",
    "PretrainedCfg", "TimmFamily", "ViTCommon", "Beit", "Beit3", "abstract_variables", "build_model",
    "cast_for_inference", "get_pretrained_cfg", "init_variables", "list_models", "pretrained_cfg", "prng_key",
    "register_family", "split_model_name",
]
