"""beit-jax: timm's BEiT (v1, v2) and BEiT-3 in JAX/Flax (linen, and NNX through
`create_nnx_model`), with timm weight conversion, batch feature extraction and fine-tuning.

`import beit_jax` never imports torch.
"""
from .checkpoints import load_state_dict_file, save_flax_checkpoint, save_safetensors
from .sinks import iter_features, read_features
from .factory import create_model, load_checkpoint
from .hub import PretrainedUnavailableError
from .mapping import CheckpointMismatchError, convert_timm_state_dict, to_timm_state_dict
from .nnx_model import BeitNNX, create_nnx_model
from .models import Beit, Beit3, PretrainedCfg, build_model, cast_for_inference, get_pretrained_cfg, list_models
from .transforms import ImageLoadError, create_transform, load_image, resolve_data_config

__version__ = "0.1.0"

__all__ = [
    "Beit", "Beit3", "BeitNNX", "PretrainedCfg", "create_model", "create_nnx_model", "list_models", "get_pretrained_cfg", "build_model",
    "CheckpointMismatchError", "PretrainedUnavailableError", "convert_timm_state_dict",
    "to_timm_state_dict", "load_checkpoint", "load_state_dict_file", "save_flax_checkpoint",
    "save_safetensors", "resolve_data_config", "create_transform", "load_image", "ImageLoadError",
    "read_features", "iter_features", "cast_for_inference",
]
