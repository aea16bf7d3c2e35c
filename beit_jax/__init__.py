"""beit-jax: timm's BEiT (v1, v2) and BEiT-3 in JAX/Flax (linen, and NNX through
`create_nnx_model`), with timm weight conversion, batch feature extraction and fine-tuning.

`import beit_jax` never imports torch. Its names load on first use (PEP 562), so a process that
needs only a part (a decode worker of `extract --backend process` imports `beit_jax.data`: Pillow
and numpy) does not pay for JAX and Flax: it starts in a fraction of a second, not seconds.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    ".checkpoints": ("load_state_dict_file", "save_flax_checkpoint", "save_safetensors"),
    ".sinks": ("iter_features", "read_features"),
    ".factory": ("create_model", "load_checkpoint"),
    ".hub": ("PretrainedUnavailableError",),
    ".mapping": ("CheckpointMismatchError", "convert_timm_state_dict", "to_timm_state_dict"),
    ".nnx_model": ("BeitNNX", "create_nnx_model"),
    ".models": ("Beit", "Beit3", "PretrainedCfg", "build_model", "cast_for_inference", "get_pretrained_cfg",
                "list_models"),
    ".transforms": ("ImageLoadError", "create_transform", "load_image", "resolve_data_config"),
    ".models.segmentation": ("BeitSegmenter", "list_segmentation_models"),
    ".segmentation": ("create_segmentation_model",),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [
    "Beit", "Beit3", "BeitNNX", "PretrainedCfg", "create_model", "create_nnx_model", "list_models", "get_pretrained_cfg", "build_model",
    "CheckpointMismatchError", "PretrainedUnavailableError", "convert_timm_state_dict",
    "to_timm_state_dict", "load_checkpoint", "load_state_dict_file", "save_flax_checkpoint",
    "save_safetensors", "resolve_data_config", "create_transform", "load_image", "ImageLoadError",
    "read_features", "iter_features", "cast_for_inference",
    "BeitSegmenter", "create_segmentation_model", "list_segmentation_models",
]


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name], __name__), name)
    else:
        try:  # a submodule: `import beit_jax; beit_jax.extract.extract(...)` as before
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_WHERE))


if TYPE_CHECKING:  # what static tools and IDEs see
    from .checkpoints import load_state_dict_file, save_flax_checkpoint, save_safetensors  # noqa: F401
    from .factory import create_model, load_checkpoint  # noqa: F401
    from .hub import PretrainedUnavailableError  # noqa: F401
    from .mapping import CheckpointMismatchError, convert_timm_state_dict, to_timm_state_dict  # noqa: F401
    from .models import (Beit, Beit3, PretrainedCfg, build_model, cast_for_inference,  # noqa: F401
                         get_pretrained_cfg, list_models)
    from .models.segmentation import BeitSegmenter, list_segmentation_models  # noqa: F401
    from .nnx_model import BeitNNX, create_nnx_model  # noqa: F401
    from .segmentation import create_segmentation_model  # noqa: F401
    from .sinks import iter_features, read_features  # noqa: F401
    from .transforms import ImageLoadError, create_transform, load_image, resolve_data_config  # noqa: F401
