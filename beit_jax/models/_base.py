"""The linen base both families build on (`ViTCommon`: shared config fields, FLOP count, the
forward methods, the trace-time speed choices) and the helpers of those forward methods
(pooling, intermediates, input checks), plus `cast_for_inference`.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from ..layers import Dtype, backend_platform, layer_norm, resolve_attn_impl, trunc_normal
from ._registry import PretrainedCfg


class ViTCommon(nn.Module):
    """The linen base of Beit and Beit3: the config fields they share (below), derived config,
    FLOP count, the forward methods (forward_features, forward_head, __call__, attention_maps,
    forward_intermediates) and the trace-time speed choices that make `jax.jit(model.apply)` the
    fast path (attention implementation, `attn_impl`; micro-batching on CPU, `micro_batch`). A
    subclass declares its own fields (at least `norm_eps` and `head_init_scale`, whose defaults
    differ), and defines `setup` (embedding, blocks, then `_setup_head()`), `_embed(x,
    deterministic) -> (tokens, shared relative position bias or None)` and `_attention_has_bias`;
    its blocks take (x, shared bias, deterministic) and have `attention_weights(x, shared bias)`."""
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
    use_fc_norm: Optional[bool] = None
    attn_impl: str = "auto"  # 'auto' (cuDNN on an NVIDIA GPU when it can run, else XLA) | 'xla' | 'cudnn' |
    #                          'dot_product_attention' (jax.nn's XLA path); see attention_impl()
    micro_batch: Union[int, str, None] = "auto"  # rows per chunk of a batch, see micro_batch_rows()
    dtype: Dtype = jnp.float32  # compute dtype
    param_dtype: Dtype = jnp.float32  # storage dtype
    precision: Any = None  # matmul precision, e.g. jax.lax.Precision.HIGHEST for fp32 parity on TPU
    pretrained_cfg: Optional[PretrainedCfg] = None  # data config and Hub id of the tag, if any

    _attention_has_bias = False

    def _setup_head(self) -> None:
        """The end both families share, called from a subclass's setup: the final norm (fc_norm for
        avg pooling, else norm), head_drop and the head (timm's init, scaled by head_init_scale)."""
        if self.fc_norm_enabled:
            self.fc_norm = layer_norm(None, self.param_dtype, self.norm_eps)
        else:
            self.norm = layer_norm(None, self.param_dtype, self.norm_eps)
        self.head_drop = nn.Dropout(self.drop_rate)
        if self.num_classes > 0:
            self.head = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                                 kernel_init=trunc_normal(0.02, self.head_init_scale),
                                 bias_init=nn.initializers.zeros, precision=self.precision)

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
        return vit_gflop_per_image(self.img_size, self.patch_size, self.in_chans, self.embed_dim, self.depth,
                                   self.mlp_ratio, self.num_classes)

    def attention_impl(self, training: bool = False) -> Tuple[str, Optional[str]]:
        """(implementation, why not cuDNN or None) that this model's attention runs on this
        machine's default backend: the decision each layer makes at trace time
        (`layers.resolve_attn_impl`), for reporting ('auto' on CPU -> ('xla', 'cuDNN ... needs ...'))."""
        return resolve_attn_impl(
            self.attn_impl, platform=backend_platform(), dtype=self.dtype, head_dim=self.embed_dim // self.num_heads,
            seq_len=self.num_patches + 1, has_bias=self._attention_has_bias,
            training=training, dropout=training and self.attn_drop_rate > 0)

    def micro_batch_rows(self, batch: int, deterministic: bool = True) -> Optional[int]:
        """Rows per chunk for a batch of `batch` images, or None to run it whole.

        Chunks run one after another (a `scan` over the batch, parameters shared), with the same
        results. 'auto': on a single CPU device, for inference (deterministic), the largest chunk of
        4 to 8 rows that divides the batch: XLA:CPU keeps its per-image speed flat as the batch
        grows only while a chunk's activations stay in cache (benchmarks/RESULTS.md). Accelerators,
        and batches sharded over several devices, run whole. An int: chunks of that many rows
        whenever it divides a larger batch (anywhere: on a batch sharded over devices it costs
        speed). None or 0: never. Init and `capture_intermediates` always run whole.
        """
        mb = self.micro_batch
        if isinstance(mb, str):
            if mb != "auto":
                raise ValueError(f"micro_batch must be 'auto', a positive int or None (got {mb!r})")
            if not deterministic or backend_platform() != "cpu" or jax.device_count() != 1:
                return None
            mb = next((d for d in range(8, 3, -1) if batch % d == 0), None)
        if not mb or batch <= mb or batch % mb:
            return None
        return int(mb)

    def _micro_batched(self, fn, x, deterministic: bool):
        """fn(module, x) over micro-batches of x's leading axis (see micro_batch_rows); the
        chunks' outputs (any pytree of (chunk, ...) arrays) are put back together in order."""
        check_image_input(x, self.img_size, self.in_chans)
        b = x.shape[0]
        mb = self.micro_batch_rows(b, deterministic)
        if mb is None or self.is_initializing() or self.is_mutable_collection("intermediates"):
            return fn(self, x)
        scan = nn.scan(lambda module, carry, chunk: (carry, fn(module, chunk)), variable_broadcast="params",
                       split_rngs={"params": False, "dropout": True}, length=b // mb)
        _, out = scan(self, None, x.reshape(b // mb, mb, *x.shape[1:]))
        return jax.tree_util.tree_map(lambda a: a.reshape(b, *a.shape[2:]), out)

    # ---- forward methods -------------------------------------------------------------------
    def _final_norm(self, x):
        """timm's `self.norm`: identity when fc_norm is used (avg pooling)."""
        return x if self.fc_norm_enabled else self.norm(x).astype(self.dtype)

    def forward_features(self, x, deterministic: bool = True):
        """(B, H, W, C) -> (B, 1 + N, D) tokens after the last block and timm's `norm`."""
        return self._micro_batched(lambda m, x: m._features(x, deterministic), x, deterministic)

    def _features(self, x, deterministic: bool):
        x, shared = self._embed(x, deterministic)
        for blk in self.blocks:
            x = blk(x, shared, deterministic)
        return self._final_norm(x)

    def forward_head(self, x, pre_logits: bool = False, deterministic: bool = True):
        """(B, 1 + N, D) tokens -> (B, num_classes) logits, or (B, D) pooled when pre_logits."""
        x = pool_tokens(x, self.global_pool)
        if self.fc_norm_enabled:
            x = self.fc_norm(x).astype(self.dtype)
        x = self.head_drop(x, deterministic=deterministic)
        if pre_logits or self.num_classes == 0:
            return x
        return self.head(x)

    def __call__(self, x, deterministic: bool = True):
        return self._micro_batched(
            lambda m, x: m.forward_head(m._features(x, deterministic), deterministic=deterministic), x, deterministic)

    def attention_maps(self, x, block: int = -1):
        """(B, heads, N, N) attention probabilities of one block (default: the last), cls first.

        `maps[:, :, 0, 1:].reshape(B, heads, Hp, Wp)` is where the cls token looks in the image.
        """
        block = block_index(block, self.depth)

        def maps(m, x):
            x, shared = m._embed(x, True)
            for blk in m.blocks[:block]:
                x = blk(x, shared, True)
            return m.blocks[block].attention_weights(x, shared)

        return self._micro_batched(maps, x, True)

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
        check_output_fmt(output_fmt)
        take, max_index = feature_take_indices(self.depth, indices)

        def run(m, x):
            b = x.shape[0]
            x, shared = m._embed(x, deterministic)
            blocks = m.blocks[: max_index + 1] if stop_early else m.blocks
            intermediates = []
            for i, blk in enumerate(blocks):
                x = blk(x, shared, deterministic)
                if i in take:
                    intermediates.append(m._final_norm(x) if norm else x)
            intermediates = format_intermediates(intermediates, b, m.grid_size, output_fmt, return_prefix_tokens)
            return intermediates if intermediates_only else (m._final_norm(x), intermediates)

        return self._micro_batched(run, x, deterministic)


def check_image_input(x, img_size: int, in_chans: int) -> None:
    """A clear error for input that is not an NHWC batch of the model's resolution."""
    if x.ndim != 4 or x.shape[-1] != in_chans:
        raise ValueError(f"expected NHWC input (B, H, W, {in_chans}), got shape {x.shape}")
    if x.shape[1:3] != (img_size, img_size):
        raise ValueError(
            f"input is {x.shape[1]}x{x.shape[2]} but the model was built for {img_size}x{img_size}; "
            f"create it with img_size={x.shape[1]} (position tables are resized on load) or resize the images")


def pool_tokens(x, global_pool: str, num_prefix_tokens: int = 1):
    """timm's global_pool_nlc for (B, prefix + N, D) tokens: 'avg' (mean of the patch tokens, summed
    in float32), 'token' (the cls token) or '' (tokens unchanged)."""
    if global_pool == "avg":
        return x[:, num_prefix_tokens:].astype(jnp.float32).mean(axis=1).astype(x.dtype)
    if global_pool == "token":
        return x[:, 0]
    return x


def check_global_pool(global_pool: str) -> None:
    if global_pool not in ("", "avg", "token"):
        raise ValueError(f"global_pool must be 'avg', 'token' or '' (got {global_pool!r})")


def block_index(block: int, depth: int) -> int:
    """A block index, negative from the end, checked against the depth."""
    index = depth + block if block < 0 else block
    if not 0 <= index < depth:
        raise ValueError(f"block {block} is out of range (0 to {depth - 1})")
    return index


def format_intermediates(intermediates, batch: int, grid_size: Tuple[int, int], output_fmt: str,
                         return_prefix_tokens: bool, num_prefix_tokens: int = 1):
    """timm's forward_intermediates tail: split off the prefix (cls) tokens, reshape to
    (B, Hp, Wp, D) for 'NHWC' (timm's NCHW, channels last) or keep (B, N, D) for 'NLC'."""
    prefix = [y[:, :num_prefix_tokens] for y in intermediates]
    intermediates = [y[:, num_prefix_tokens:] for y in intermediates]
    if output_fmt == "NHWC":
        intermediates = [y.reshape(batch, grid_size[0], grid_size[1], -1) for y in intermediates]
    if return_prefix_tokens:
        intermediates = list(zip(intermediates, prefix))
    return intermediates


def check_output_fmt(output_fmt: str) -> None:
    if output_fmt not in ("NHWC", "NLC"):
        raise ValueError(f"output_fmt must be 'NHWC' or 'NLC' (got {output_fmt!r})")


def vit_gflop_per_image(img_size: int, patch_size: int, in_chans: int, embed_dim: int, depth: int,
                        mlp_ratio: float, num_classes: int, num_prefix_tokens: int = 1) -> float:
    """Forward GFLOP per image of a ViT-style model: 2 x MACs of every matmul (patch embed, qkv,
    attention, proj, MLP, head); norms and softmax left out, as in timm's published GMACs."""
    num_patches = (img_size // patch_size) ** 2
    n, d = num_patches + num_prefix_tokens, embed_dim
    hidden = int(d * mlp_ratio)
    per_block = 2 * n * (4 * d * d + 2 * d * hidden) + 2 * 2 * n * n * d
    patch = 2 * num_patches * patch_size ** 2 * in_chans * d
    return (depth * per_block + patch + 2 * d * num_classes) / 1e9


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


_FP32_PARAM_NAMES = frozenset({"relative_position_bias_table"})  # used in float32 by the forward


def cast_for_inference(model, variables):
    """Pre-cast, once, the parameters the forward casts to `model.dtype` on every call anyway.

    With dtype=bfloat16 and float32 params, every call spent ~80 ms (BEiT-B, 2-core CPU) casting
    86M weights; results are identical because the same roundings happen, just earlier. LayerNorm
    params (any module holding a `scale`) and relative position tables, used in float32, are kept.
    Training keeps float32 master params and does not use this.
    """
    if jnp.dtype(model.dtype) == jnp.float32:
        return variables

    def cast(tree):
        if not isinstance(tree, dict) and not hasattr(tree, "items"):
            return jnp.asarray(tree).astype(model.dtype) if jnp.issubdtype(tree.dtype, jnp.floating) else tree
        if "scale" in tree:  # a LayerNorm: computes in float32
            return tree
        return {k: (v if k in _FP32_PARAM_NAMES else cast(v)) for k, v in tree.items()}

    return cast(variables)
