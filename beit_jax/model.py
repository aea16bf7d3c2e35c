"""BEiT (v1 and v2) as Flax linen modules, numerically matching timm's `timm/models/beit.py`.

Input is NHWC (B, H, W, C), normalized as the model's data config says. Parameter names follow
timm's (`blocks_3/attn/qkv/kernel` <-> `blocks.3.attn.qkv.weight`), see `weights.py`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from .relpos import gen_relative_position_index, num_relative_distance

Dtype = Any
LAYER_NORM_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class PretrainedCfg:
    """What a pretrained tag carries beside its weights (timm's `pretrained_cfg`)."""
    architecture: str
    tag: str
    hf_hub_id: str
    num_classes: int
    input_size: Tuple[int, int, int] = (3, 224, 224)
    crop_pct: float = 0.9
    interpolation: str = "bicubic"
    mean: Tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: Tuple[float, float, float] = (0.5, 0.5, 0.5)
    crop_mode: str = "center"

    @property
    def name(self) -> str:
        return f"{self.architecture}.{self.tag}"


def trunc_normal(std: float = 0.02, scale: float = 1.0) -> Callable:
    """timm's trunc_normal_(std) (truncated at +-2 absolute, i.e. +-100 std for std=.02: ~normal)."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.truncated_normal(key, -2.0 / std, 2.0 / std, shape, dtype) * (std * scale)

    return init


# PyTorch's default Conv2d init (kaiming_uniform a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_conv_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_conv_bias_init(fan_in: int) -> Callable:
    bound = 1.0 / np.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _dot_general_f32_acc(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """dot_general accumulating (and returning) float32: bf16 inputs keep fp32 sums."""
    out = jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                              preferred_element_type=jnp.float32)
    return out.astype(lhs.dtype)


def _dense(features: int, name: str, dtype: Dtype, param_dtype: Dtype, scale: float = 1.0,
           use_bias: bool = True, precision=None) -> nn.Dense:
    low_precision = jnp.dtype(dtype) != jnp.float32
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                    kernel_init=trunc_normal(0.02, scale), bias_init=nn.initializers.zeros,
                    precision=precision, name=name,
                    dot_general=_dot_general_f32_acc if low_precision else None)


def _layer_norm(name: Optional[str], param_dtype: Dtype, eps: float) -> nn.LayerNorm:
    # LayerNorm always computes in float32, whatever the compute dtype.
    return nn.LayerNorm(epsilon=eps, dtype=jnp.float32, param_dtype=param_dtype, name=name)


class DropPath(nn.Module):
    """Stochastic depth per sample (timm's DropPath): zero whole residual branches, rescale the rest."""
    rate: float

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        if deterministic or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        rng = self.make_rng("dropout")
        mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(mask, x / keep, jnp.zeros_like(x))


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens: (B, H, W, C) -> (B, H/p * W/p, D)."""
    patch_size: int = 16
    embed_dim: int = 768
    in_chans: int = 3
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        p = self.patch_size
        fan_in = self.in_chans * p * p
        x = nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                    param_dtype=self.param_dtype, kernel_init=torch_conv_kernel_init,
                    bias_init=torch_conv_bias_init(fan_in), precision=self.precision, name="proj")(x)
        b, h, w, d = x.shape
        return x.reshape(b, h * w, d)


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
    attn_impl: str = "xla"  # 'xla' (einsum + softmax) | 'dot_product_attention' (jax.nn's, cuDNN on GPU)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x, shared_rel_pos_bias=None, deterministic: bool = True, return_weights: bool = False):
        b, n, c = x.shape
        h = self.num_heads
        head_dim = self.dim // h
        qkv = _dense(3 * self.dim, "qkv", self.dtype, self.param_dtype, use_bias=False,
                     precision=self.precision)(x)
        if self.qkv_bias:
            q_bias = self.param("q_bias", nn.initializers.zeros, (self.dim,), self.param_dtype)
            v_bias = self.param("v_bias", nn.initializers.zeros, (self.dim,), self.param_dtype)
            bias = jnp.concatenate([q_bias, jnp.zeros_like(q_bias), v_bias]).astype(qkv.dtype)
            qkv = qkv + bias
        # Head-major (3, B, heads, N, hd): XLA:CPU runs the attention dots and softmax several
        # times faster in this layout than on (B, N, heads, hd) views (measured, benchmarks/).
        qkv = qkv.reshape(b, n, 3, h, head_dim).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q = q * jnp.asarray(head_dim ** -0.5, q.dtype)

        bias = None
        if self.window_size is not None:
            table = self.param("relative_position_bias_table", nn.initializers.zeros,
                               (num_relative_distance(self.window_size), h), self.param_dtype)
            bias = gather_rel_pos_bias(table, self.window_size)
        if shared_rel_pos_bias is not None:
            bias = shared_rel_pos_bias if bias is None else bias + shared_rel_pos_bias

        if return_weights:  # (B, heads, N, N) probabilities, for inspection (attention maps)
            attn = jnp.einsum("bhqd,bhkd->bhqk", q, k, precision=self.precision,
                              preferred_element_type=jnp.float32)
            return jax.nn.softmax(attn if bias is None else attn + bias[None], axis=-1)
        if self.attn_impl == "dot_product_attention":
            # jax.nn.dot_product_attention: cuDNN fused attention on GPU when it applies.
            out = jax.nn.dot_product_attention(
                q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
                bias=None if bias is None else bias[None].astype(q.dtype), scale=1.0)
            out = out.reshape(b, n, c)
        else:
            attn = jnp.einsum("bhqd,bhkd->bhqk", q, k, precision=self.precision,
                              preferred_element_type=jnp.float32)
            if bias is not None:
                attn = attn + bias[None]
            # softmax(attn) @ v with the normalisation applied to the (N, hd) output instead of
            # the (N, N) probabilities: same result, one pass less over the largest tensor.
            e = jnp.exp(attn - jax.lax.stop_gradient(attn.max(axis=-1, keepdims=True)))
            denom = e.sum(axis=-1, keepdims=True)
            e = nn.Dropout(self.attn_drop)(e, deterministic=deterministic)
            out = jnp.einsum("bhqk,bhkd->bhqd", e.astype(self.dtype), v, precision=self.precision,
                             preferred_element_type=jnp.float32)
            out = (out / denom).astype(self.dtype)
            out = out.transpose(0, 2, 1, 3).reshape(b, n, c)
        out = _dense(self.dim, "proj", self.dtype, self.param_dtype, scale=self.proj_scale,
                     precision=self.precision)(out)
        return nn.Dropout(self.proj_drop)(out, deterministic=deterministic)


def gelu_exact(x):
    """Exact (erf) GELU written as torch computes it; 2.6x faster on XLA:CPU than nn.gelu's exact path."""
    return x * 0.5 * (1.0 + jax.lax.erf(x * jnp.asarray(0.7071067811865476, x.dtype)))


class Mlp(nn.Module):
    hidden_dim: int
    out_dim: int
    drop: float = 0.0
    fc2_scale: float = 1.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        x = _dense(self.hidden_dim, "fc1", self.dtype, self.param_dtype, precision=self.precision)(x)
        x = gelu_exact(x)
        x = nn.Dropout(self.drop)(x, deterministic=deterministic)
        x = _dense(self.out_dim, "fc2", self.dtype, self.param_dtype, scale=self.fc2_scale,
                   precision=self.precision)(x)
        return nn.Dropout(self.drop)(x, deterministic=deterministic)


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
    attn_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    def setup(self):
        depth_scale = 1.0 / np.sqrt(2.0 * (self.layer_id + 1))
        self.norm1 = _layer_norm(None, self.param_dtype, self.norm_eps)
        self.attn = Attention(self.dim, self.num_heads, qkv_bias=self.qkv_bias, window_size=self.window_size,
                              attn_drop=self.attn_drop, proj_drop=self.proj_drop, proj_scale=depth_scale,
                              attn_impl=self.attn_impl, dtype=self.dtype, param_dtype=self.param_dtype,
                              precision=self.precision)
        self.drop_path1 = DropPath(self.drop_path)
        self.norm2 = _layer_norm(None, self.param_dtype, self.norm_eps)
        self.mlp = Mlp(int(self.dim * self.mlp_ratio), self.dim, self.proj_drop, depth_scale, self.dtype,
                       self.param_dtype, self.precision)
        self.drop_path2 = DropPath(self.drop_path)
        if self.init_values:
            init = nn.initializers.constant(self.init_values)
            self.gamma_1 = self.param("gamma_1", init, (self.dim,), self.param_dtype)
            self.gamma_2 = self.param("gamma_2", init, (self.dim,), self.param_dtype)

    def __call__(self, x, shared_rel_pos_bias=None, deterministic: bool = True):
        y = self.attn(self.norm1(x).astype(self.dtype), shared_rel_pos_bias, deterministic)
        if self.init_values:
            y = y * self.gamma_1.astype(y.dtype)
        x = x + self.drop_path1(y, deterministic)
        y = self.mlp(self.norm2(x).astype(self.dtype), deterministic)
        if self.init_values:
            y = y * self.gamma_2.astype(y.dtype)
        return x + self.drop_path2(y, deterministic)

    def attention_weights(self, x, shared_rel_pos_bias=None):
        """(B, heads, N, N) softmax attention probabilities of this block for input tokens x."""
        return self.attn(self.norm1(x).astype(self.dtype), shared_rel_pos_bias, return_weights=True)


def feature_take_indices(num_blocks: int, indices: Union[None, int, Sequence[int]]) -> Tuple[list, int]:
    """timm's rule: None -> all blocks, int n -> the last n, sequence -> those (negative from the end)."""
    if indices is None:
        indices = num_blocks
    if isinstance(indices, int):
        if not 0 < indices <= num_blocks:
            raise ValueError(f"last-n ({indices}) is out of range (1 to {num_blocks})")
        take = [num_blocks - indices + i for i in range(indices)]
    else:
        take = []
        for i in indices:
            idx = num_blocks + i if i < 0 else i
            if not 0 <= idx < num_blocks:
                raise ValueError(f"feature index {idx} is out of range (0 to {num_blocks - 1})")
            take.append(idx)
    return take, max(take)


class Beit(nn.Module):
    """BEiT / BEiT v2 vision transformer (timm's `Beit`). The module's fields are its config.

    `__call__(x)` = `forward_head(forward_features(x))`: (B, H, W, 3) -> (B, num_classes) logits,
    or pooled (B, embed_dim) features when `num_classes == 0`.
    """
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    global_pool: str = "avg"  # 'avg' (mean of patch tokens, then fc_norm) | 'token' (cls) | '' (none)
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_rate: float = 0.0
    pos_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    init_values: Optional[float] = None
    use_abs_pos_emb: bool = True
    use_rel_pos_bias: bool = False
    use_shared_rel_pos_bias: bool = False
    head_init_scale: float = 0.001
    use_fc_norm: Optional[bool] = None
    norm_eps: float = LAYER_NORM_EPS
    attn_impl: str = "xla"  # 'xla' (fastest on CPU) | 'dot_product_attention' (cuDNN fused on GPU)
    dtype: Dtype = jnp.float32  # compute dtype
    param_dtype: Dtype = jnp.float32  # storage dtype
    precision: Any = None  # matmul precision, e.g. jax.lax.Precision.HIGHEST for fp32 parity on TPU
    pretrained_cfg: Optional[PretrainedCfg] = None  # data config and Hub id of the tag, if any

    # ---- derived config -------------------------------------------------------------------
    @property
    def grid_size(self) -> Tuple[int, int]:
        return (self.img_size // self.patch_size, self.img_size // self.patch_size)

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @property
    def fc_norm_enabled(self) -> bool:
        return self.global_pool == "avg" if self.use_fc_norm is None else self.use_fc_norm

    @property
    def num_features(self) -> int:
        return self.embed_dim

    @property
    def gflop_per_image(self) -> float:
        """Forward FLOPs per image in GFLOP: 2 x MACs of every matmul (patch embed, qkv, attention,
        proj, MLP, head), the count benchmarks use for GFLOP/s and model FLOP utilisation."""
        n, d = self.num_patches + 1, self.embed_dim
        hidden = int(d * self.mlp_ratio)
        per_block = 2 * n * (4 * d * d + 2 * d * hidden) + 2 * 2 * n * n * d
        patch = 2 * self.num_patches * self.patch_size ** 2 * self.in_chans * d
        return (self.depth * per_block + patch + 2 * d * self.num_classes) / 1e9

    def setup(self):
        if self.global_pool not in ("", "avg", "token"):
            raise ValueError(f"global_pool must be 'avg', 'token' or '' (got {self.global_pool!r})")
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
        if self.attn_impl not in ("xla", "dot_product_attention"):
            raise ValueError(f"attn_impl must be 'xla' or 'dot_product_attention' (got {self.attn_impl!r})")
        self.blocks = [
            Block(self.embed_dim, self.num_heads, mlp_ratio=self.mlp_ratio, qkv_bias=self.qkv_bias,
                  window_size=self.grid_size if self.use_rel_pos_bias else None,
                  init_values=self.init_values, proj_drop=self.proj_drop_rate,
                  attn_drop=self.attn_drop_rate, drop_path=float(dpr[i]), layer_id=i,
                  norm_eps=self.norm_eps, attn_impl=self.attn_impl, dtype=self.dtype,
                  param_dtype=self.param_dtype, precision=self.precision)
            for i in range(self.depth)
        ]
        if self.fc_norm_enabled:
            self.fc_norm = _layer_norm(None, self.param_dtype, self.norm_eps)
        else:
            self.norm = _layer_norm(None, self.param_dtype, self.norm_eps)
        self.head_drop = nn.Dropout(self.drop_rate)
        if self.num_classes > 0:
            self.head = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                                 kernel_init=trunc_normal(0.02, self.head_init_scale),
                                 bias_init=nn.initializers.zeros, precision=self.precision)

    # ---- pieces -----------------------------------------------------------------------------
    def _final_norm(self, x):
        """timm's `self.norm`: identity when fc_norm is used (avg pooling)."""
        return x if self.fc_norm_enabled else self.norm(x).astype(self.dtype)

    def _embed(self, x, deterministic: bool):
        if x.ndim != 4 or x.shape[-1] != self.in_chans:
            raise ValueError(f"expected NHWC input (B, H, W, {self.in_chans}), got shape {x.shape}")
        if x.shape[1:3] != (self.img_size, self.img_size):
            raise ValueError(
                f"input is {x.shape[1]}x{x.shape[2]} but the model was built for "
                f"{self.img_size}x{self.img_size}; create it with img_size={x.shape[1]} "
                f"(position tables are resized on load) or resize the images")
        x = self.patch_embed(x.astype(self.dtype))
        cls = jnp.broadcast_to(self.cls_token.astype(x.dtype), (x.shape[0], 1, self.embed_dim))
        x = jnp.concatenate([cls, x], axis=1)
        if self.use_abs_pos_emb:
            x = x + self.pos_embed.astype(x.dtype)
        x = self.pos_drop(x, deterministic=deterministic)
        shared = self.rel_pos_bias() if self.use_shared_rel_pos_bias else None
        return x, shared

    def forward_features(self, x, deterministic: bool = True):
        """(B, H, W, C) -> (B, 1 + N, D) tokens after the last block and timm's `norm`."""
        x, shared = self._embed(x, deterministic)
        for blk in self.blocks:
            x = blk(x, shared, deterministic)
        return self._final_norm(x)

    def forward_head(self, x, pre_logits: bool = False, deterministic: bool = True):
        """(B, 1 + N, D) tokens -> (B, num_classes) logits, or (B, D) pooled when pre_logits."""
        if self.global_pool == "avg":
            x = x[:, 1:].astype(jnp.float32).mean(axis=1).astype(x.dtype)
        elif self.global_pool == "token":
            x = x[:, 0]
        if self.fc_norm_enabled:
            x = self.fc_norm(x).astype(self.dtype)
        x = self.head_drop(x, deterministic=deterministic)
        if pre_logits or self.num_classes == 0:
            return x
        return self.head(x)

    def __call__(self, x, deterministic: bool = True):
        return self.forward_head(self.forward_features(x, deterministic), deterministic=deterministic)

    def attention_maps(self, x, block: int = -1):
        """(B, heads, N, N) attention probabilities of one block (default: the last), cls first.

        `maps[:, :, 0, 1:].reshape(B, heads, Hp, Wp)` is where the cls token looks in the image.
        """
        block = self.depth + block if block < 0 else block
        if not 0 <= block < self.depth:
            raise ValueError(f"block {block} is out of range (0 to {self.depth - 1})")
        x, shared = self._embed(x, True)
        for blk in self.blocks[:block]:
            x = blk(x, shared, True)
        return self.blocks[block].attention_weights(x, shared)

    def forward_intermediates(
        self,
        x,
        indices: Union[None, int, Sequence[int]] = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NHWC",
        intermediates_only: bool = False,
        deterministic: bool = True,
    ):
        """Tokens of selected blocks, as timm's `forward_intermediates` (NHWC instead of NCHW).

        indices: None (all), n (last n) or block indices. Each intermediate is (B, Hp, Wp, D) for
        'NHWC' or (B, N, D) for 'NLC', cls token removed (returned beside it with
        return_prefix_tokens). norm applies timm's final `norm` (identity under avg pooling).
        Returns the list if intermediates_only, else (final features, list).
        """
        if output_fmt not in ("NHWC", "NLC"):
            raise ValueError(f"output_fmt must be 'NHWC' or 'NLC' (got {output_fmt!r})")
        take, max_index = feature_take_indices(self.depth, indices)
        b = x.shape[0]
        x, shared = self._embed(x, deterministic)
        blocks = self.blocks[: max_index + 1] if stop_early else self.blocks
        intermediates = []
        for i, blk in enumerate(blocks):
            x = blk(x, shared, deterministic)
            if i in take:
                intermediates.append(self._final_norm(x) if norm else x)
        prefix = [y[:, :1] for y in intermediates]
        intermediates = [y[:, 1:] for y in intermediates]
        if output_fmt == "NHWC":
            gh, gw = self.grid_size
            intermediates = [y.reshape(b, gh, gw, -1) for y in intermediates]
        if return_prefix_tokens:
            intermediates = list(zip(intermediates, prefix))
        if intermediates_only:
            return intermediates
        return self._final_norm(x), intermediates


def default_micro_batch() -> Optional[int]:
    """Rows per chunk for `chunked`: 8 on CPU (XLA:CPU slows down once a batch's attention and MLP
    activations leave the cache: 9.5 -> 12 img/s at batch 32, benchmarks/RESULTS.md), none on
    GPU/TPU, which want the whole batch at once."""
    return 8 if jax.default_backend() == "cpu" else None


def chunked(fn: Callable, micro_batch: Optional[int] = None) -> Callable:
    """`fn(variables, x, ...)` run over micro-batches of x's leading axis with `jax.lax.map`.

    Same results as fn on the whole batch; under jit it keeps per-image speed flat as the batch
    grows on CPU. A batch not divisible by micro_batch (or smaller) runs in one piece.
    """

    def run(variables, x, *args, **kwargs):
        mb = micro_batch
        b = x.shape[0]
        if not mb or b <= mb or b % mb:
            return fn(variables, x, *args, **kwargs)
        out = jax.lax.map(lambda xc: fn(variables, xc, *args, **kwargs), x.reshape(b // mb, mb, *x.shape[1:]))
        return jax.tree_util.tree_map(lambda a: a.reshape(b, *a.shape[2:]), out)

    return run


_FP32_PARAM_OWNERS = frozenset({"norm", "norm1", "norm2", "fc_norm"})  # LayerNorms compute in float32


def cast_for_inference(model: "Beit", variables):
    """Pre-cast, once, the parameters the forward casts to `model.dtype` on every call anyway.

    With dtype=bfloat16 and float32 params, every call spent ~80 ms (BEiT-B, 2-core CPU) casting
    86M weights; results are identical because the same roundings happen, just earlier. LayerNorm
    params and relative position tables (used in float32) are kept as they are. Training keeps
    float32 master params and does not use this.
    """
    if jnp.dtype(model.dtype) == jnp.float32:
        return variables

    def cast(path, leaf):
        names = {getattr(k, "key", None) for k in path}
        if names & _FP32_PARAM_OWNERS or "relative_position_bias_table" in names:
            return leaf
        return jnp.asarray(leaf).astype(model.dtype) if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf

    return jax.tree_util.tree_map_with_path(cast, variables)
