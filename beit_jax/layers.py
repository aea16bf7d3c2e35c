"""Building blocks shared by the BEiT families: timm-exact initialisers, Dense/LayerNorm in the
right precision, patch embedding, MLP, drop path, the attention core and intermediate indexing.

Inputs are NHWC / (B, N, D). Compute runs in `dtype`; LayerNorm, softmax and attention logits
stay float32; bf16 matmuls accumulate in float32.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
ATTN_IMPLS = ("auto", "xla", "cudnn", "dot_product_attention")  # see resolve_attn_impl


def trunc_normal(std: float = 0.02, scale: float = 1.0) -> Callable:
    """timm's trunc_normal_(std) (truncated at +-2 absolute, i.e. +-100 std for std=.02: ~normal),
    times `scale` (BEiT's head_init_scale)."""
    return jax.nn.initializers.truncated_normal(std * scale, lower=-2.0 / std, upper=2.0 / std)


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


def dense(features: int, name: Optional[str], dtype: Dtype, param_dtype: Dtype, scale: float = 1.0,
          use_bias: bool = True, precision=None) -> nn.Dense:
    """timm's Linear: trunc-normal(.02) weight (times `scale`), zero bias."""
    low_precision = jnp.dtype(dtype) != jnp.float32
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                    kernel_init=trunc_normal(0.02, scale), bias_init=nn.initializers.zeros,
                    precision=precision, name=name,
                    dot_general=_dot_general_f32_acc if low_precision else None)


def layer_norm(name: Optional[str], param_dtype: Dtype, eps: float) -> nn.LayerNorm:
    """LayerNorm that always computes in float32, whatever the compute dtype."""
    return nn.LayerNorm(epsilon=eps, dtype=jnp.float32, param_dtype=param_dtype, name=name)


def drop_path(rate: float, name: Optional[str] = None) -> nn.Dropout:
    """Stochastic depth per sample (timm's DropPath): whole residual branches of a (B, N, D)
    input are zeroed with probability `rate`, the rest scaled by 1 / (1 - rate)."""
    return nn.Dropout(rate, broadcast_dims=(1, 2), name=name)


def gelu_exact(x):
    """Exact (erf) GELU written as torch computes it; 2.6x faster on XLA:CPU than nn.gelu's exact path."""
    return x * 0.5 * (1.0 + jax.lax.erf(x * jnp.asarray(0.7071067811865476, x.dtype)))


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


class Mlp(nn.Module):
    """fc1 -> exact GELU -> (norm) -> fc2, with dropout; `norm_eps` adds BEiT-3's inner LayerNorm."""
    hidden_dim: int
    out_dim: int
    drop: float = 0.0
    fc2_scale: float = 1.0
    norm_eps: Optional[float] = None  # LayerNorm after the activation (timm's scale_mlp_norm)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        x = dense(self.hidden_dim, "fc1", self.dtype, self.param_dtype, precision=self.precision)(x)
        x = gelu_exact(x)
        x = nn.Dropout(self.drop)(x, deterministic=deterministic)
        if self.norm_eps is not None:
            x = layer_norm("norm", self.param_dtype, self.norm_eps)(x).astype(self.dtype)
        x = dense(self.out_dim, "fc2", self.dtype, self.param_dtype, scale=self.fc2_scale,
                  precision=self.precision)(x)
        return nn.Dropout(self.drop)(x, deterministic=deterministic)


def split_heads(qkv: jax.Array, num_heads: int) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """(B, N, 3D) fused projections -> q, k, v as (B, heads, N, head_dim).

    Head-major: XLA:CPU runs the attention dots and softmax several times faster in this layout
    than on (B, N, heads, hd) views (measured, benchmarks/).
    """
    b, n, c3 = qkv.shape
    qkv = qkv.reshape(b, n, 3, num_heads, c3 // (3 * num_heads)).transpose(2, 0, 3, 1, 4)
    return qkv[0], qkv[1], qkv[2]


def attention_weights(q, k, bias=None, precision=None):
    """(B, heads, N, N) float32 softmax probabilities of scaled q against k (plus bias)."""
    attn = jnp.einsum("bhqd,bhkd->bhqk", q, k, precision=precision, preferred_element_type=jnp.float32)
    return jax.nn.softmax(attn if bias is None else attn + bias[None], axis=-1)


# ---- attention ---------------------------------------------------------------------------------
# cuDNN's fused attention (through jax.nn.dot_product_attention(implementation="cudnn"), JAX 0.10):
# fp16/bf16 only, head dim a multiple of 8 and at most 128 (256 from Hopper on; we keep the bound that
# holds on every GPU), no dropout through jax.nn, and no bias gradient for an odd sequence length
# (BEiT's 197/577/1025 are all odd). See jax/_src/cudnn/fused_attention_stablehlo.py.
CUDNN_DTYPES = ("bfloat16", "float16")
CUDNN_MAX_HEAD_DIM = 128
_warned: set = set()


def backend_platform() -> str:
    """'cuda' (NVIDIA GPU), 'rocm' (AMD GPU), 'tpu' or 'cpu': JAX's default backend, GPUs told apart."""
    backend = jax.default_backend()
    if backend != "gpu":
        return backend
    from jax.extend.backend import get_backend

    return "rocm" if "rocm" in get_backend().platform_version.lower() else "cuda"


def resolve_attn_impl(requested: str, *, platform: str, dtype: Dtype, head_dim: int, seq_len: int,
                      has_bias: bool, training: bool = False, dropout: bool = False) -> Tuple[str, Optional[str]]:
    """The attention implementation that runs for a request, and why cuDNN does not (or None).

    Pure: decided from the backend platform (`backend_platform()`), compute dtype, head dim,
    sequence length (tokens, cls included), whether a bias is added, whether this is a training
    pass (gradients) and whether attention dropout is active.
      'xla'                    einsum + softmax in XLA (the CPU/TPU path; normalises after the AV product)
      'dot_product_attention'  jax.nn.dot_product_attention(implementation='xla'): the cuDNN path's code
                               with XLA's kernel (a reference; not faster than 'xla')
      'cudnn'                  cuDNN fused attention; falls back to 'xla' (the caller warns) when it cannot
      'auto'                   'cudnn' when it can run, else 'xla' (silently)
    """
    check_attn_impl(requested)
    if requested in ("xla", "dot_product_attention"):
        return requested, None
    name = jnp.dtype(dtype).name
    if platform != "cuda":
        why = f"cuDNN attention needs an NVIDIA GPU (this backend is {platform})"
    elif name not in CUDNN_DTYPES:
        why = f"cuDNN attention needs bfloat16/float16 compute (this model computes in {name}; dtype=jnp.bfloat16)"
    elif head_dim % 8 or head_dim > CUDNN_MAX_HEAD_DIM:
        why = (f"cuDNN attention needs a head dim that is a multiple of 8 and at most {CUDNN_MAX_HEAD_DIM} "
               f"(got {head_dim})")
    elif training and dropout:
        why = "jax.nn's cuDNN attention has no attention dropout (attn_drop_rate > 0 in training)"
    elif training and has_bias and seq_len % 2:
        why = (f"cuDNN has no attention-bias gradient for an odd sequence length ({seq_len} tokens), "
               f"which training needs")
    else:
        return "cudnn", None
    return "xla", why


def warn_once(message: str) -> None:
    """One warning per distinct message per process (a model traces attention once per layer)."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def attend(q, k, v, bias, *, impl: str, dtype: Dtype, precision=None, dropout: Optional[Callable] = None,
           training: bool = False):
    """softmax(q k^T + bias) v for head-major (B, heads, N, hd) q (already scaled), k, v.

    bias: (heads, N, N) float32 or None. Returns (B, N, heads * hd) in `dtype`. impl: one of
    ATTN_IMPLS, resolved here at trace time by `resolve_attn_impl` (a 'cudnn' request that cannot
    run warns once and runs 'xla'). dropout: a function applied to the attention weights (None
    when attention dropout is off); training: whether this pass is differentiated for training.
    """
    b, h, n, hd = q.shape
    requested = impl
    impl, why = resolve_attn_impl(requested, platform=backend_platform(), dtype=dtype, head_dim=hd, seq_len=n,
                                  has_bias=bias is not None, training=training, dropout=dropout is not None)
    if why and requested == "cudnn":
        warn_once(f"attn_impl='cudnn' cannot run here: {why}; running attn_impl='xla' instead")
    if impl == "dot_product_attention":
        return _jax_nn_attention(q, k, v, bias, "xla").astype(dtype)
    if impl == "cudnn":
        if bias is not None and n % 2:  # gradients outside training (saliency): XLA's backward, never a crash
            return _with_xla_backward(lambda *a: _jax_nn_attention(*a, "cudnn"), q, k, v, bias).astype(dtype)
        return _jax_nn_attention(q, k, v, bias, "cudnn").astype(dtype)
    return _xla_attention(q, k, v, bias, dtype, precision, dropout)


def _jax_nn_attention(q, k, v, bias, implementation: str):
    """jax.nn.dot_product_attention on head-major inputs: (B, heads, N, hd) -> (B, N, heads * hd)."""
    b, h, n, hd = q.shape
    out = jax.nn.dot_product_attention(
        q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
        bias=None if bias is None else bias[None].astype(q.dtype), scale=1.0, implementation=implementation)
    return out.reshape(b, n, h * hd)


def _xla_attention(q, k, v, bias, dtype, precision=None, dropout=None):
    """The 'xla' path: applies the softmax normalisation to the (N, hd) output instead of the
    (N, N) probabilities (same result, one pass less over the largest tensor)."""
    b, h, n, hd = q.shape
    attn = jnp.einsum("bhqd,bhkd->bhqk", q, k, precision=precision, preferred_element_type=jnp.float32)
    if bias is not None:
        attn = attn + bias[None]
    e = jnp.exp(attn - jax.lax.stop_gradient(attn.max(axis=-1, keepdims=True)))
    denom = e.sum(axis=-1, keepdims=True)
    if dropout is not None:
        e = dropout(e)
    out = jnp.einsum("bhqk,bhkd->bhqd", e.astype(dtype), v, precision=precision,
                     preferred_element_type=jnp.float32)
    out = (out / denom).astype(dtype)
    return out.transpose(0, 2, 1, 3).reshape(b, n, h * hd)


def _with_xla_backward(fast: Callable, q, k, v, bias):
    """fast(q, k, v, bias) forward, with the gradient of the 'xla' path (recomputed) backward.

    For a fused kernel that has no backward for these shapes: the result is the fast one, the
    gradient the reference one, so jax.grad through an inference-mode model never fails."""

    def reference(q, k, v, bias):
        return _xla_attention(q, k, v, bias, q.dtype)

    @jax.custom_vjp
    def run(q, k, v, bias):
        return fast(q, k, v, bias)

    def fwd(q, k, v, bias):
        return fast(q, k, v, bias), (q, k, v, bias)

    def bwd(res, g):
        return jax.vjp(reference, *res)[1](g.astype(res[0].dtype))

    run.defvjp(fwd, bwd)
    return run(q, k, v, bias)


def check_attn_impl(attn_impl: str) -> None:
    if attn_impl not in ATTN_IMPLS:
        raise ValueError(f"attn_impl must be one of {ATTN_IMPLS} (got {attn_impl!r})")
