"""Pretrained configs: what each timm `arch.tag` carries beside its weights (timm's `pretrained_cfg`).

The first stage of the loading stack (see README "Layout"): plain data, no JAX. Tags mirror
`timm/models/beit.py` (v1, v2) and `timm/models/vision_transformer.py` (BEiT-3); the first tag
listed per architecture is timm's default, as `timm.create_model('beit_base_patch16_224')` resolves it.
"""
from __future__ import annotations

import dataclasses
import fnmatch
from typing import Dict, List, Optional, Tuple

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
BEIT_MEAN = BEIT_STD = (0.5, 0.5, 0.5)


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


def _cfg(name: str, num_classes: int = 1000, input_size: Tuple[int, int, int] = (3, 224, 224),
         crop_pct: float = 0.9, mean=BEIT_MEAN, std=BEIT_STD, hub: bool = True) -> PretrainedCfg:
    arch, tag = name.split(".")
    return PretrainedCfg(architecture=arch, tag=tag, hf_hub_id=f"timm/{name}" if hub else None,
                         num_classes=num_classes, input_size=input_size, crop_pct=crop_pct,
                         interpolation="bicubic", mean=tuple(mean), std=tuple(std))


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
    # BEiT-3 (timm: VisionTransformer with scale_attn_norm / scale_mlp_norm); .pt tags are headless.
    _cfg("beit3_base_patch16_224.in22k_ft_in1k", crop_pct=1.0, **_V2),
    _cfg("beit3_base_patch16_224.indomain_in22k_ft_in1k", crop_pct=1.0, **_V2),
    _cfg("beit3_large_patch16_224.in22k_ft_in1k", crop_pct=1.0, **_V2),
    _cfg("beit3_large_patch16_224.indomain_in22k_ft_in1k", crop_pct=1.0, **_V2),
    _cfg("beit3_giant_patch14_224.untrained", crop_pct=1.0, hub=False, **_V2),
    _cfg("beit3_giant_patch14_336.untrained", input_size=(3, 336, 336), crop_pct=1.0, hub=False, **_V2),
    _cfg("beit3_base_patch16_224.pt", num_classes=0, crop_pct=1.0, **_V2),
    _cfg("beit3_base_patch16_224.indomain_pt", num_classes=0, crop_pct=1.0, **_V2),
    _cfg("beit3_large_patch16_224.pt", num_classes=0, crop_pct=1.0, **_V2),
    _cfg("beit3_large_patch16_224.indomain_pt", num_classes=0, crop_pct=1.0, **_V2),
    # Tiny models for tests of everything but full-size numerics (timm's `test_vit` idea).
    _cfg("test_beit.untrained", input_size=(3, 64, 64), hub=False),
    _cfg("test_beit3.untrained", input_size=(3, 64, 64), crop_pct=1.0, hub=False, **_V2),
]}

DEFAULT_TAGS: Dict[str, str] = {}
for _c in PRETRAINED_CFGS.values():
    DEFAULT_TAGS.setdefault(_c.architecture, _c.tag)


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
