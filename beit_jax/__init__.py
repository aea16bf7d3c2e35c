"""beit-jax: timm's BEiT (v1, v2) in JAX/Flax, with timm weight conversion and batch inference.

`import beit_jax` never imports torch.
"""
from .model import Beit, PretrainedCfg
from .registry import create_model, list_models, get_pretrained_cfg, build_model
from .weights import (
    CheckpointMismatchError,
    PretrainedUnavailableError,
    convert_timm_state_dict,
    to_timm_state_dict,
    load_checkpoint,
    save_flax_checkpoint,
)
from .transforms import resolve_data_config, create_transform, load_image, ImageLoadError

__version__ = "0.1.0"

__all__ = [
    "Beit", "PretrainedCfg", "create_model", "list_models", "get_pretrained_cfg", "build_model",
    "CheckpointMismatchError", "PretrainedUnavailableError", "convert_timm_state_dict",
    "to_timm_state_dict", "load_checkpoint", "save_flax_checkpoint", "resolve_data_config",
    "create_transform", "load_image", "ImageLoadError", "read_features",
]


def __getattr__(name):
    # extract pulls in the data pipeline; load it only when asked for.
    if name == "read_features":
        from .extract import read_features
        return read_features
    raise AttributeError(f"module 'beit_jax' has no attribute {name!r}")
