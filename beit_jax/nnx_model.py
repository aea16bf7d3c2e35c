"""`create_nnx_model`: the same models as an `nnx.Module`, for Flax NNX code.

Top of the loading stack, beside `factory.py` (it builds on `create_model`; nothing imports it but
the package). `BeitNNX` holds the linen module (`Beit` / `Beit3`) and its parameters as
`nnx.Param`s; every forward is that module's own `apply`, so linen and NNX give the same numbers
from one definition. The parameters sit at the linen tree's paths (`model.blocks_3["attn"]["qkv"]
["kernel"]`), so `nnx.state(model, nnx.Param)` is the linen `variables["params"]` as an
nnx.State, and `finetune.layer_lr_multipliers` / `weight_decay_mask` / `make_optimizer` take it
as they take linen variables.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import jax
from flax import nnx

from .factory import create_model


class BeitNNX(nnx.Module):
    """A beit-jax model as an NNX module: `model(x)`, `model.forward_features(x)`,
    `model.forward_head(tokens, pre_logits=True)`, `model.forward_intermediates(x, indices=...)`,
    `model.attention_maps(x)`, with the linen methods' arguments and results.

    Dropout and drop path follow `model.train()` / `model.eval()` (or `nnx.view(model,
    deterministic=...)`): in training mode each call draws a key from `rngs.dropout`. Built in
    eval mode.

    module: the linen `Beit` / `Beit3` (its fields are the config). variables: its
    `{"params": ...}` (from `create_model`, a checkpoint or linen training).
    """

    def __init__(self, module, variables: Dict[str, Any], *, rngs: nnx.Rngs):
        self.module = module
        for name, tree in variables["params"].items():  # one attribute per top-level subtree
            setattr(self, name, nnx.data(jax.tree_util.tree_map(nnx.Param, tree)))
        self.rngs = rngs
        self.deterministic = True

    # ---- the linen module does the computing ----------------------------------------------
    def to_linen(self) -> Tuple[Any, Dict[str, Any]]:
        """(linen module, {"params": ...}) with the current parameter values, for `model.apply`,
        `save_flax_checkpoint`, `to_timm_state_dict` or the linen fine-tuning loop."""
        return self.module, {"params": nnx.to_pure_dict(nnx.state(self, nnx.Param))}

    def _apply(self, *args, method: str, **kwargs):
        rngs = {} if self.deterministic else {"dropout": self.rngs.dropout()}
        return self.module.apply(self.to_linen()[1], *args, method=method, rngs=rngs, **kwargs)

    def __call__(self, x):
        """(B, H, W, C) -> (B, num_classes) logits, or pooled (B, D) when num_classes == 0."""
        return self._apply(x, method="__call__", deterministic=self.deterministic)

    def forward_features(self, x):
        """(B, H, W, C) -> (B, 1 + N, D) tokens after the last block and timm's `norm`."""
        return self._apply(x, method="forward_features", deterministic=self.deterministic)

    def forward_head(self, x, pre_logits: bool = False):
        """(B, 1 + N, D) tokens -> (B, num_classes) logits, or (B, D) pooled when pre_logits."""
        return self._apply(x, method="forward_head", pre_logits=pre_logits, deterministic=self.deterministic)

    def forward_intermediates(self, x, indices=None, **kwargs):
        """Tokens of selected blocks (see the linen `forward_intermediates` for the options)."""
        return self._apply(x, method="forward_intermediates", indices=indices, deterministic=self.deterministic,
                           **kwargs)

    def attention_maps(self, x, block: int = -1):
        """(B, heads, N, N) attention probabilities of one block (default: the last), cls first."""
        return self._apply(x, method="attention_maps", block=block)

    def set_view(self, deterministic: Optional[bool] = None):
        """For `nnx.view(model, deterministic=...)`."""
        if deterministic is not None:
            self.deterministic = deterministic

    # ---- the config and optimizer facts are the linen module's ----------------------------------
    def group_matcher(self, coarse: bool = False):
        return self.module.group_matcher(coarse)

    def no_weight_decay(self):
        return self.module.no_weight_decay()


def _config_property(name: str) -> property:
    return property(lambda self: getattr(self.module, name), doc=f"The linen module's `{name}`.")


for _name in ("pretrained_cfg", "img_size", "in_chans", "patch_size", "num_classes", "global_pool", "embed_dim",
              "depth", "num_heads", "dtype", "param_dtype", "grid_size", "num_features", "gflop_per_image"):
    setattr(BeitNNX, _name, _config_property(_name))


def create_nnx_model(name: str, pretrained: bool = False, *, rng: int | jax.Array = 0, **kwargs) -> BeitNNX:
    """`create_model` as an `nnx.Module` (`BeitNNX`): same names, tags, options and weights.

    rng seeds the random init / a fresh head, as for `create_model`, and the dropout/drop-path
    stream (`model.rngs`). The model starts in eval mode: call `model.train()` to fine-tune.
    """
    module, variables = create_model(name, pretrained, rng=rng, **kwargs)
    return BeitNNX(module, variables, rngs=nnx.Rngs(dropout=rng))
