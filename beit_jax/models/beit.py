"""BEiT (v1 and v2) as Flax linen modules, numerically matching timm's `timm/models/beit.py`, and
the family's registration: its timm tags, architecture rows and state-dict facts (end of file).

Input is NHWC (B, H, W, C), normalized as the model's data config says. Parameter names follow
timm's (`blocks_3/attn/qkv/kernel` <-> `blocks.3.attn.qkv.weight`, see `beit_jax/mapping.py`). Facts timm
keeps on the model for optimizers (`group_matcher`, `no_weight_decay`) are methods here too.
"""
from __future__ import annotations

import re
from typing import Any, Dict, Optional, Set, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ..layers import (Dtype, Mlp, PatchEmbed, attend, attention_weights, check_attn_impl, dense, drop_path,
                      layer_norm, split_heads, trunc_normal)
from ._base import ViTCommon, check_global_pool, check_image_input
from ._registry import (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Architecture, TimmFamily,
                        pretrained_cfg, register_family)
from ..relpos import gen_relative_position_index, num_relative_distance

LAYER_NORM_EPS = 1e-6


class RelativePositionBias(nn.Module):
    """Learned (num_rel, heads) table gathered into a (heads, N, N) attention bias, N = Wh*Ww + 1."""
    window_size: Tuple[int, int]
    num_heads: int
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self):
        table = self.param("relative_position_bias_table", nn.initializers.zeros,
                           (num_relative_distance(self.window_size), self.num_heads), self.param_dtype)
        return gather_rel_pos_bias(table, self.window_size)


def gather_rel_pos_bias(table: jax.Array, window_size: Tuple[int, int]) -> jax.Array:
    """(num_rel, heads) table -> (heads, N, N) float32 bias; the index is a trace-time constant."""
    index = gen_relative_position_index(window_size)
    n = index.shape[0]
    bias = jnp.take(table.astype(jnp.float32), jnp.asarray(index.reshape(-1)), axis=0)
    return bias.reshape(n, n, -1).transpose(2, 0, 1)


class Attention(nn.Module):
    """Multi-head self-attention with fused qkv, q/v bias (k bias is zero) and relative position bias.

    (B, N, D) -> (B, N, D). `shared_rel_pos_bias` is a (heads, N, N) bias added to the per-layer one.
    Attention logits, bias and softmax are float32 whatever the compute dtype.
    """
    dim: int
    num_heads: int
    qkv_bias: bool = True
    window_size: Optional[Tuple[int, int]] = None
    attn_drop: float = 0.0
    proj_drop: float = 0.0
    proj_scale: float = 1.0  # BEiT's init rescale of the output projection by depth
    attn_impl: str = "auto"  # see layers.resolve_attn_impl: 'auto' | 'xla' | 'cudnn' | 'dot_product_attention'
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x, shared_rel_pos_bias=None, deterministic: bool = True, return_weights: bool = False):
        h = self.num_heads
        head_dim = self.dim // h
        qkv = dense(3 * self.dim, "qkv", self.dtype, self.param_dtype, use_bias=False,
                    precision=self.precision)(x)
        if self.qkv_bias:
            q_bias = self.param("q_bias", nn.initializers.zeros, (self.dim,), self.param_dtype)
            v_bias = self.param("v_bias", nn.initializers.zeros, (self.dim,), self.param_dtype)
            bias = jnp.concatenate([q_bias, jnp.zeros_like(q_bias), v_bias]).astype(qkv.dtype)
            qkv = qkv + bias
        q, k, v = split_heads(qkv, h)
        q = q * jnp.asarray(head_dim ** -0.5, q.dtype)

        bias = None
        if self.window_size is not None:
            table = self.param("relative_position_bias_table", nn.initializers.zeros,
                               (num_relative_distance(self.window_size), h), self.param_dtype)
            bias = gather_rel_pos_bias(table, self.window_size)
        if shared_rel_pos_bias is not None:
            bias = shared_rel_pos_bias if bias is None else bias + shared_rel_pos_bias

        if return_weights:  # (B, heads, N, N) probabilities, for inspection (attention maps)
            return attention_weights(q, k, bias, self.precision)
        attn_drop = nn.Dropout(self.attn_drop)
        dropout = None if deterministic or self.attn_drop == 0 else (lambda e: attn_drop(e, deterministic=False))
        out = attend(q, k, v, bias, impl=self.attn_impl, dtype=self.dtype, precision=self.precision,
                     dropout=dropout, training=not deterministic)
        out = dense(self.dim, "proj", self.dtype, self.param_dtype, scale=self.proj_scale,
                    precision=self.precision)(out)
        return nn.Dropout(self.proj_drop)(out, deterministic=deterministic)


class Block(nn.Module):
    """Pre-norm transformer block with layer scale (gamma_1/gamma_2) and drop path."""
    dim: int
    num_heads: int
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    window_size: Optional[Tuple[int, int]] = None
    init_values: Optional[float] = None
    proj_drop: float = 0.0
    attn_drop: float = 0.0
    drop_path: float = 0.0
    layer_id: int = 0
    norm_eps: float = LAYER_NORM_EPS
    attn_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    def setup(self):
        depth_scale = 1.0 / np.sqrt(2.0 * (self.layer_id + 1))
        self.norm1 = layer_norm(None, self.param_dtype, self.norm_eps)
        self.attn = Attention(self.dim, self.num_heads, qkv_bias=self.qkv_bias, window_size=self.window_size,
                              attn_drop=self.attn_drop, proj_drop=self.proj_drop, proj_scale=depth_scale,
                              attn_impl=self.attn_impl, dtype=self.dtype, param_dtype=self.param_dtype,
                              precision=self.precision)
        self.drop_path1 = drop_path(self.drop_path)
        self.norm2 = layer_norm(None, self.param_dtype, self.norm_eps)
        self.mlp = Mlp(int(self.dim * self.mlp_ratio), self.dim, self.proj_drop, depth_scale, dtype=self.dtype,
                       param_dtype=self.param_dtype, precision=self.precision)
        self.drop_path2 = drop_path(self.drop_path)
        if self.init_values:
            init = nn.initializers.constant(self.init_values)
            self.gamma_1 = self.param("gamma_1", init, (self.dim,), self.param_dtype)
            self.gamma_2 = self.param("gamma_2", init, (self.dim,), self.param_dtype)

    def __call__(self, x, shared_rel_pos_bias=None, deterministic: bool = True):
        y = self.attn(self.norm1(x).astype(self.dtype), shared_rel_pos_bias, deterministic)
        if self.init_values:
            y = y * self.gamma_1.astype(y.dtype)
        x = x + self.drop_path1(y, deterministic=deterministic)
        y = self.mlp(self.norm2(x).astype(self.dtype), deterministic)
        if self.init_values:
            y = y * self.gamma_2.astype(y.dtype)
        return x + self.drop_path2(y, deterministic=deterministic)

    def attention_weights(self, x, shared_rel_pos_bias=None):
        """(B, heads, N, N) softmax attention probabilities of this block for input tokens x."""
        return self.attn(self.norm1(x).astype(self.dtype), shared_rel_pos_bias, return_weights=True)


class Beit(ViTCommon):
    """BEiT / BEiT v2 vision transformer (timm's `Beit`). Its config: the fields shared
    with BEiT-3 (`_base.ViTCommon`: sizes, drop rates, pooling, dtype, speed choices) and these.

    `__call__(x)` = `forward_head(forward_features(x))`: (B, H, W, 3) -> (B, num_classes) logits,
    or pooled (B, embed_dim) features when `num_classes == 0`. Two speed choices are made at trace
    time from the backend and shapes, so `jax.jit(model.apply)` is the fast path everywhere:
    micro-batching on CPU (`micro_batch`, see `micro_batch_rows`) and cuDNN or XLA attention
    (`attn_impl`, see `attention_impl`).
    """
    init_values: Optional[float] = None
    use_abs_pos_emb: bool = True
    use_rel_pos_bias: bool = False
    use_shared_rel_pos_bias: bool = False
    head_init_scale: float = 0.001
    norm_eps: float = LAYER_NORM_EPS

    # ---- facts for optimizers (timm's methods of the same names, on timm parameter names) -----
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Regexes grouping parameters into layers (stem, block i, final norm with the last block),
        for layer-wise lr decay; `finetune.layer_ids` applies them as timm's group_with_matcher."""
        return dict(stem=r"^cls_token|pos_embed|patch_embed|rel_pos_bias",
                    blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    def no_weight_decay(self) -> Set[str]:
        """Parameter names (fnmatch patterns) excluded from weight decay beside every 1-D one."""
        return {"pos_embed", "cls_token", "*relative_position_bias_table"}

    def setup(self):
        check_global_pool(self.global_pool)
        self.patch_embed = PatchEmbed(self.patch_size, self.embed_dim, self.in_chans, self.dtype,
                                      self.param_dtype, self.precision)
        self.cls_token = self.param("cls_token", trunc_normal(0.02), (1, 1, self.embed_dim),
                                    self.param_dtype)
        if self.use_abs_pos_emb:
            self.pos_embed = self.param("pos_embed", trunc_normal(0.02),
                                        (1, self.num_patches + 1, self.embed_dim), self.param_dtype)
        self.pos_drop = nn.Dropout(self.pos_drop_rate)
        if self.use_shared_rel_pos_bias:
            self.rel_pos_bias = RelativePositionBias(self.grid_size, self.num_heads, self.param_dtype)
        dpr = np.linspace(0.0, self.drop_path_rate, self.depth)
        check_attn_impl(self.attn_impl)
        self.blocks = [
            Block(self.embed_dim, self.num_heads, mlp_ratio=self.mlp_ratio, qkv_bias=self.qkv_bias,
                  window_size=self.grid_size if self.use_rel_pos_bias else None,
                  init_values=self.init_values, proj_drop=self.proj_drop_rate,
                  attn_drop=self.attn_drop_rate, drop_path=float(dpr[i]), layer_id=i,
                  norm_eps=self.norm_eps, attn_impl=self.attn_impl, dtype=self.dtype,
                  param_dtype=self.param_dtype, precision=self.precision)
            for i in range(self.depth)
        ]
        self._setup_head()

    # ---- pieces (the forward methods are ViTCommon's) ----------------------------------------
    @property
    def _attention_has_bias(self) -> bool:
        return self.use_rel_pos_bias or self.use_shared_rel_pos_bias

    def _embed(self, x, deterministic: bool):
        check_image_input(x, self.img_size, self.in_chans)
        x = self.patch_embed(x.astype(self.dtype))
        cls = jnp.broadcast_to(self.cls_token.astype(x.dtype), (x.shape[0], 1, self.embed_dim))
        x = jnp.concatenate([cls, x], axis=1)
        if self.use_abs_pos_emb:
            x = x + self.pos_embed.astype(x.dtype)
        x = self.pos_drop(x, deterministic=deterministic)
        shared = self.rel_pos_bias() if self.use_shared_rel_pos_bias else None
        return x, shared


# ---- registration: timm's tags (first per architecture = its default), architectures, state dict --
_V2 = dict(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
_BASE = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
             use_abs_pos_emb=False, use_rel_pos_bias=True)
_LARGE = dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0,
              use_abs_pos_emb=False, use_rel_pos_bias=True)
_TEST = dict(patch_size=16, embed_dim=64, depth=2, num_heads=2, mlp_ratio=4.0,
             use_abs_pos_emb=False, use_rel_pos_bias=True)
_TINY = dict(img_size=64, embed_dim=64, depth=2, num_heads=2)


def _arch(name: str, **fields) -> Architecture:
    return Architecture(Beit, fields, name)


BEIT = TimmFamily(
    title="BEiT", module=Beit, marker=re.compile(r"^blocks\.\d+\.attn\.(q_bias|relative_position_bias_table)$"),
    order=("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
           "rel_pos_bias.relative_position_bias_table", "blocks.", "norm.weight", "norm.bias",
           "fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"),
    block_order=("gamma_1", "gamma_2", "norm1.weight", "norm1.bias", "attn.q_bias", "attn.v_bias",
                 "attn.relative_position_bias_table", "attn.qkv.weight", "attn.proj.weight",
                 "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                 "mlp.fc2.weight", "mlp.fc2.bias"),
    ignored=(re.compile(r"(^|\.)relative_position_index$"), re.compile(r"(^|\.)k_bias$")),
)

register_family(
    BEIT,
    architectures={
        "beit_base_patch16_224": _arch("beit_base_patch16_224", **_BASE, img_size=224, init_values=0.1),
        "beit_base_patch16_384": _arch("beit_base_patch16_384", **_BASE, img_size=384, init_values=0.1),
        "beit_large_patch16_224": _arch("beit_large_patch16_224", **_LARGE, img_size=224, init_values=1e-5),
        "beit_large_patch16_384": _arch("beit_large_patch16_384", **_LARGE, img_size=384, init_values=1e-5),
        "beit_large_patch16_512": _arch("beit_large_patch16_512", **_LARGE, img_size=512, init_values=1e-5),
        "beitv2_base_patch16_224": _arch("beitv2_base_patch16_224", **_BASE, img_size=224, init_values=1e-5),
        "beitv2_large_patch16_224": _arch("beitv2_large_patch16_224", **_LARGE, img_size=224, init_values=1e-5),
        # A tiny model for tests of everything but full-size numerics (timm's `test_vit` idea).
        "test_beit": Architecture(Beit, dict(_TEST, img_size=64, init_values=0.1), "beit_base_patch16_224",
                                  dict(_TINY, init_values=0.1)),
    },
    pretrained=[
        pretrained_cfg("beit_base_patch16_224.in22k_ft_in22k_in1k"),
        pretrained_cfg("beit_base_patch16_384.in22k_ft_in22k_in1k", input_size=(3, 384, 384), crop_pct=1.0),
        pretrained_cfg("beit_base_patch16_224.in22k_ft_in22k", num_classes=21841),
        pretrained_cfg("beit_large_patch16_224.in22k_ft_in22k_in1k"),
        pretrained_cfg("beit_large_patch16_384.in22k_ft_in22k_in1k", input_size=(3, 384, 384), crop_pct=1.0),
        pretrained_cfg("beit_large_patch16_512.in22k_ft_in22k_in1k", input_size=(3, 512, 512), crop_pct=1.0),
        pretrained_cfg("beit_large_patch16_224.in22k_ft_in22k", num_classes=21841),
        pretrained_cfg("beitv2_base_patch16_224.in1k_ft_in22k_in1k", **_V2),
        pretrained_cfg("beitv2_base_patch16_224.in1k_ft_in1k", **_V2),
        pretrained_cfg("beitv2_base_patch16_224.in1k_ft_in22k", num_classes=21841, **_V2),
        pretrained_cfg("beitv2_large_patch16_224.in1k_ft_in22k_in1k", crop_pct=0.95, **_V2),
        pretrained_cfg("beitv2_large_patch16_224.in1k_ft_in1k", crop_pct=0.95, **_V2),
        pretrained_cfg("beitv2_large_patch16_224.in1k_ft_in22k", num_classes=21841, **_V2),
        pretrained_cfg("test_beit.untrained", input_size=(3, 64, 64), hub=False),
    ],
)
