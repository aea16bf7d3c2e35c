"""BEiT-3's vision tower as a Flax linen module, numerically matching timm's remapping of it.

timm builds `beit3_*` as a `VisionTransformer` with `scale_attn_norm=True, scale_mlp_norm=True`:
ViT blocks (fused qkv with a full bias, no layer scale) with an extra LayerNorm on the attention
output before `proj` and one after the MLP activation, a learned absolute position embedding over
cls + patches, LayerNorm eps 1e-5 and average pooling into `fc_norm`. The attention core, patch
embedding, MLP and the rest are `layers.py`'s, shared with BEiT v1/v2 (`model.py`).

Input is NHWC. Parameter names follow timm's (`blocks_3/attn/norm/scale` <->
`blocks.3.attn.norm.weight`); the original `beit3.*` checkpoints are remapped in `mapping.py`.
"""
from __future__ import annotations

from typing import Any, Dict, Set

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from .layers import (Dtype, Mlp, PatchEmbed, ViTCommon, attend, attention_weights, check_attn_impl,
                     check_global_pool, check_image_input, dense, drop_path, layer_norm, split_heads,
                     trunc_normal)

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
    shared with BEiT (`layers.ViTCommon`: sizes, drop rates, pooling, dtype, speed choices) and these.

    `__call__(x)` = `forward_head(forward_features(x))`: (B, H, W, 3) -> (B, num_classes) logits,
    or pooled (B, embed_dim) features when `num_classes == 0`. Same methods as `Beit`, and the
    same trace-time speed choices (`attn_impl`, `micro_batch`: see `layers.ViTCommon`).
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
