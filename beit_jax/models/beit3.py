"""BEiT-3's vision tower as a Flax linen module, numerically matching timm's remapping of it.

timm builds `beit3_*` as a `VisionTransformer` with `scale_attn_norm=True, scale_mlp_norm=True`:
ViT blocks (fused qkv with a full bias, no layer scale) with an extra LayerNorm on the attention
output before `proj` and one after the MLP activation, a learned absolute position embedding over
cls + patches, LayerNorm eps 1e-5 and average pooling into `fc_norm`. The attention core, patch
embedding, MLP and the rest are `layers.py`'s, shared with BEiT v1/v2 (`models/beit.py`).

Input is NHWC. Parameter names follow timm's (`blocks_3/attn/norm/scale` <->
`blocks.3.attn.norm.weight`); the original `beit3.*` checkpoints are remapped here
(`convert_beit3_original`), and the family registers itself at the end of the file.
"""
from __future__ import annotations

import re
from typing import Any, Dict, Mapping, Set

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from .._arrays import to_numpy

from ..layers import (Dtype, Mlp, PatchEmbed, attend, attention_weights, check_attn_impl, dense, drop_path,
                      layer_norm, split_heads, trunc_normal)
from ._base import ViTCommon, check_global_pool, check_image_input
from ._registry import (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Architecture, ForeignLayout, TimmFamily,
                        pretrained_cfg, register_family)

LAYER_NORM_EPS = 1e-5


class Attention(nn.Module):
    """timm's Attention with scale_norm: fused qkv (+ bias), softmax attention, LayerNorm, proj.

    (B, N, D) -> (B, N, D); logits and softmax in float32 whatever the compute dtype.
    """
    dim: int
    num_heads: int
    qkv_bias: bool = True
    attn_drop: float = 0.0
    proj_drop: float = 0.0
    norm_eps: float = LAYER_NORM_EPS
    attn_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x, deterministic: bool = True, return_weights: bool = False):
        head_dim = self.dim // self.num_heads
        qkv = dense(3 * self.dim, "qkv", self.dtype, self.param_dtype, use_bias=self.qkv_bias,
                    precision=self.precision)(x)
        q, k, v = split_heads(qkv, self.num_heads)
        q = q * jnp.asarray(head_dim ** -0.5, q.dtype)
        if return_weights:  # (B, heads, N, N) probabilities, for attention maps
            return attention_weights(q, k, None, self.precision)
        attn_drop = nn.Dropout(self.attn_drop)
        dropout = None if deterministic or self.attn_drop == 0 else (lambda e: attn_drop(e, deterministic=False))
        out = attend(q, k, v, None, impl=self.attn_impl, dtype=self.dtype, precision=self.precision,
                     dropout=dropout, training=not deterministic)
        out = layer_norm("norm", self.param_dtype, self.norm_eps)(out).astype(self.dtype)
        out = dense(self.dim, "proj", self.dtype, self.param_dtype, precision=self.precision)(out)
        return nn.Dropout(self.proj_drop)(out, deterministic=deterministic)


class Block(nn.Module):
    """Pre-norm ViT block with BEiT-3's inner norms (timm's Block, scale_attn/mlp_norm=True)."""
    dim: int
    num_heads: int
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    proj_drop: float = 0.0
    attn_drop: float = 0.0
    drop_path: float = 0.0
    norm_eps: float = LAYER_NORM_EPS
    attn_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    def setup(self):
        self.norm1 = layer_norm(None, self.param_dtype, self.norm_eps)
        self.attn = Attention(self.dim, self.num_heads, qkv_bias=self.qkv_bias, attn_drop=self.attn_drop,
                              proj_drop=self.proj_drop, norm_eps=self.norm_eps, attn_impl=self.attn_impl,
                              dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        self.drop_path1 = drop_path(self.drop_path)
        self.norm2 = layer_norm(None, self.param_dtype, self.norm_eps)
        self.mlp = Mlp(int(self.dim * self.mlp_ratio), self.dim, self.proj_drop, norm_eps=self.norm_eps,
                       dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        self.drop_path2 = drop_path(self.drop_path)

    def __call__(self, x, shared_rel_pos_bias=None, deterministic: bool = True):
        # shared_rel_pos_bias: always None (BEiT-3 has no relative position bias); the family's block interface
        y = self.attn(self.norm1(x).astype(self.dtype), deterministic)
        x = x + self.drop_path1(y, deterministic=deterministic)
        y = self.mlp(self.norm2(x).astype(self.dtype), deterministic)
        return x + self.drop_path2(y, deterministic=deterministic)

    def attention_weights(self, x, shared_rel_pos_bias=None):
        """(B, heads, N, N) softmax attention probabilities of this block for input tokens x."""
        return self.attn(self.norm1(x).astype(self.dtype), return_weights=True)


class Beit3(ViTCommon):
    """BEiT-3 vision transformer (timm's `beit3_*` VisionTransformer). Its config: the fields
    shared with BEiT (`_base.ViTCommon`: sizes, drop rates, pooling, dtype, speed choices) and these.

    `__call__(x)` = `forward_head(forward_features(x))`: (B, H, W, 3) -> (B, num_classes) logits,
    or pooled (B, embed_dim) features when `num_classes == 0`. Same methods as `Beit`, and the
    same trace-time speed choices (`attn_impl`, `micro_batch`: see `_base.ViTCommon`).
    """
    head_init_scale: float = 1.0  # timm's ViT head: plain trunc-normal(.02)
    norm_eps: float = LAYER_NORM_EPS

    # ---- facts for optimizers (timm VisionTransformer's, on timm parameter names) --------------
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Regexes grouping parameters into layers (stem, block i, final norm with the last block)."""
        return dict(stem=r"^cls_token|reg_token|pos_embed|patch_embed|norm_pre",
                    blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    def no_weight_decay(self) -> Set[str]:
        """Parameter names (fnmatch patterns) excluded from weight decay beside every 1-D one."""
        return {"pos_embed", "cls_token", "reg_token", "dist_token"}

    def setup(self):
        check_global_pool(self.global_pool)
        check_attn_impl(self.attn_impl)
        self.patch_embed = PatchEmbed(self.patch_size, self.embed_dim, self.in_chans, self.dtype,
                                      self.param_dtype, self.precision)
        self.cls_token = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, self.embed_dim),
                                    self.param_dtype)
        self.pos_embed = self.param("pos_embed", trunc_normal(0.02), (1, self.num_patches + 1, self.embed_dim),
                                    self.param_dtype)
        self.pos_drop = nn.Dropout(self.pos_drop_rate)
        dpr = np.linspace(0.0, self.drop_path_rate, self.depth)
        self.blocks = [
            Block(self.embed_dim, self.num_heads, mlp_ratio=self.mlp_ratio, qkv_bias=self.qkv_bias,
                  proj_drop=self.proj_drop_rate, attn_drop=self.attn_drop_rate, drop_path=float(dpr[i]),
                  norm_eps=self.norm_eps, attn_impl=self.attn_impl, dtype=self.dtype,
                  param_dtype=self.param_dtype, precision=self.precision)
            for i in range(self.depth)
        ]
        self._setup_head()

    # ---- pieces -----------------------------------------------------------------------------
    def _embed(self, x, deterministic: bool):
        check_image_input(x, self.img_size, self.in_chans)
        x = self.patch_embed(x.astype(self.dtype))
        cls = jnp.broadcast_to(self.cls_token.astype(x.dtype), (x.shape[0], 1, self.embed_dim))
        x = jnp.concatenate([cls, x], axis=1) + self.pos_embed.astype(x.dtype)
        return self.pos_drop(x, deterministic=deterministic), None  # no shared relative position bias


# ---- the original (microsoft/unilm) checkpoint layout, as timm's checkpoint_filter_fn reads it ----
_BEIT3_DROPPED = ("beit3.text_embed.weight", "beit3.vision_embed.mask_token")
_BEIT3_RULES = [(re.compile(a), b) for a, b in [
    (r"beit3\.", ""), (r"vision_embed\.cls_token", "cls_token"), (r"vision_embed\.", "patch_embed."),
    (r"embed_positions\.", "pos_embed."), (r"encoder\.", ""), (r"layers\.", "blocks."),
    (r"ffn_layernorm\.", "norm."), (r"ffn\.", "mlp."), (r"self_attn_layer_norm\.", "norm1."),
    (r"self_attn\.", "attn."), (r"final_layer_norm\.", "norm2."), (r"inner_attn_ln", "norm"),
    (r"out_proj", "proj"), (r"\.A\.", "."),
]]
_BEIT3_QKV = re.compile(r"blocks\.(\d+)\.attn\.(q|k|v)_proj\.(weight|bias)$")


def is_beit3_original(state_dict: Mapping[str, Any]) -> bool:
    """An original (microsoft/unilm, torchscale) BEiT-3 checkpoint: `beit3.*` keys."""
    return any("beit3." in k for k in state_dict)


def convert_beit3_original(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    """timm's `_convert_beit3` in numpy: an original `beit3.*` multiway checkpoint -> timm's
    VisionTransformer keys. The text embedding and mask token are dropped, only the vision
    branch (`.A.`) of each multiway layer is kept, the first two rows of the fairseq position
    table are cut, and separate q/k/v projections are fused into qkv. A q/k/v set missing a
    member stays under its own names (timm drops it silently), so the load reports it."""
    renamed = {}
    for key, value in state_dict.items():
        if key in _BEIT3_DROPPED or ".B." in key:
            continue
        for pattern, repl in _BEIT3_RULES:
            key = pattern.sub(repl, key)
        if key == "pos_embed.weight":  # fairseq positions: two padding rows, then cls + patches
            renamed["pos_embed"] = to_numpy(value)[2:][None]
        else:
            renamed[key] = value
    out, stash = {}, {}
    for key, value in renamed.items():
        m = _BEIT3_QKV.fullmatch(key)
        if m is None:
            out[key] = value
            continue
        block, which, kind = m.groups()
        parts = stash.setdefault((block, kind), {})
        parts[which] = (key, value)
        if len(parts) == 3:
            out[f"blocks.{block}.attn.qkv.{kind}"] = np.concatenate([to_numpy(parts[c][1]) for c in "qkv"], 0)
    for parts in stash.values():
        if len(parts) < 3:
            out.update(dict(parts.values()))
    return out


# ---- registration: timm's tags (first per architecture = its default), architectures, state dict --
_V2 = dict(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
_BASE = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0)
_LARGE = dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0)
_GIANT = dict(patch_size=14, embed_dim=1408, depth=40, num_heads=16, mlp_ratio=4.3637)
_TINY = dict(img_size=64, embed_dim=64, depth=2, num_heads=2)


def _arch(name: str, **fields) -> Architecture:
    return Architecture(Beit3, fields, name)


BEIT3 = TimmFamily(
    title="BEiT-3", module=Beit3, marker=re.compile(r"^blocks\.\d+\.(attn|mlp)\.norm\.weight$"),
    order=("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "blocks.",
           "norm.weight", "norm.bias", "fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"),
    block_order=("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.norm.weight",
                 "attn.norm.bias", "attn.proj.weight", "attn.proj.bias", "norm2.weight", "norm2.bias",
                 "mlp.fc1.weight", "mlp.fc1.bias", "mlp.norm.weight", "mlp.norm.bias", "mlp.fc2.weight",
                 "mlp.fc2.bias"),
    foreign=(ForeignLayout("original BEiT-3 (beit3.* keys)", is_beit3_original, convert_beit3_original),),
)

register_family(
    BEIT3,
    architectures={
        "beit3_base_patch16_224": _arch("beit3_base_patch16_224", **_BASE, img_size=224),
        "beit3_large_patch16_224": _arch("beit3_large_patch16_224", **_LARGE, img_size=224),
        "beit3_giant_patch14_224": _arch("beit3_giant_patch14_224", **_GIANT, img_size=224),
        "beit3_giant_patch14_336": _arch("beit3_giant_patch14_336", **_GIANT, img_size=336),
        "test_beit3": Architecture(Beit3, dict(_BASE, **_TINY), "beit3_base_patch16_224", _TINY),
    },
    # timm: VisionTransformer with scale_attn_norm / scale_mlp_norm; .pt tags are headless.
    pretrained=[
        pretrained_cfg("beit3_base_patch16_224.in22k_ft_in1k", crop_pct=1.0, **_V2),
        pretrained_cfg("beit3_base_patch16_224.indomain_in22k_ft_in1k", crop_pct=1.0, **_V2),
        pretrained_cfg("beit3_large_patch16_224.in22k_ft_in1k", crop_pct=1.0, **_V2),
        pretrained_cfg("beit3_large_patch16_224.indomain_in22k_ft_in1k", crop_pct=1.0, **_V2),
        pretrained_cfg("beit3_giant_patch14_224.untrained", crop_pct=1.0, hub=False, **_V2),
        pretrained_cfg("beit3_giant_patch14_336.untrained", input_size=(3, 336, 336), crop_pct=1.0, hub=False, **_V2),
        pretrained_cfg("beit3_base_patch16_224.pt", num_classes=0, crop_pct=1.0, **_V2),
        pretrained_cfg("beit3_base_patch16_224.indomain_pt", num_classes=0, crop_pct=1.0, **_V2),
        pretrained_cfg("beit3_large_patch16_224.pt", num_classes=0, crop_pct=1.0, **_V2),
        pretrained_cfg("beit3_large_patch16_224.indomain_pt", num_classes=0, crop_pct=1.0, **_V2),
        pretrained_cfg("test_beit3.untrained", input_size=(3, 64, 64), crop_pct=1.0, hub=False, **_V2),
    ],
)
