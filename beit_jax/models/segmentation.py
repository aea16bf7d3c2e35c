"""Semantic segmentation: BEiT + FPN + UPerNet, transformers' `BeitForSemanticSegmentation` in Flax.

The architecture is unilm's ADE20K segmenter as transformers implements it (the checkpoints users
can download are `microsoft/beit-{base,large}-finetuned-ade-640-640`): four hidden states of the
BEiT backbone -> an FPN neck (2 deconvs = x4, 1 deconv = x2, identity, 2x2 max-pool = x0.5) ->
UPerNet (a pyramid pooling module on the coarsest map, lateral 1x1 + 3x3 convs, top-down sums,
a fused 3x3 conv, BatchNorm everywhere) -> logits at 1/4 of the input; plus an auxiliary FCN
head on the third map for training.

Every detail comes from the checkpoint's config.json (`SegConfig.from_hf`), including
`out_indices` with transformers' exact meaning: `hidden_states[i - 1]`, where hidden_states[0] is
the embedding output and hidden_states[k] the output of block k - 1 (so [3, 5, 7, 11] takes
blocks 1, 3, 5 and 9, not unilm's 3, 5, 7 and 11; a 0 takes the last block, as Python's
hidden_states[-1] does).

Loading, export and whole-image inference are in `beit_jax/segmentation.py` (above the loading
stack this package sits at the bottom of).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from ._registry import prng_key
from .beit import Beit

BN_EPS = 1e-5  # torch BatchNorm2d's default, which transformers keeps
BN_MOMENTUM = 0.9  # flax's decay = 1 - torch's momentum (0.1)
HF_LAYER_NORM_EPS = 1e-12  # BeitConfig's default


class SegmentationBackbone(Beit):
    """A BEiT without its final norm and head: the segmenter reads the blocks' outputs."""

    def _setup_head(self) -> None:
        pass

    def __call__(self, x, deterministic: bool = True):
        return self.hidden_states(x, deterministic)[-1]

    def hidden_states(self, x, deterministic: bool = True):
        """[embedding output, output of block 0, ..., output of the last block] (transformers'
        hidden_states), each (B, 1 + N, D)."""
        x, shared = self._embed(x, deterministic)
        out = [x]
        for blk in self.blocks:
            x = blk(x, shared, deterministic)
            out.append(x)
        return out


class ConvBN(nn.Module):
    """conv (no bias) -> BatchNorm -> ReLU (transformers' BeitConvLayer: `conv`, `bn`)."""
    features: int
    kernel: int
    padding: int = 0
    dilation: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(self.features, (self.kernel, self.kernel), padding=[(self.padding, self.padding)] * 2,
                    kernel_dilation=(self.dilation, self.dilation), use_bias=False, dtype=self.dtype, name="conv")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPS, dtype=self.dtype,
                         name="bn")(x)
        return nn.relu(x)


def resize_bilinear(x, size: Tuple[int, int]):
    """torch's interpolate(mode='bilinear', align_corners=False) for NHWC x (no antialiasing)."""
    if tuple(x.shape[1:3]) == tuple(size):
        return x
    return jax.image.resize(x, (x.shape[0], *size, x.shape[3]), "bilinear", antialias=False).astype(x.dtype)


def adaptive_avg_pool(x, size: int):
    """torch's AdaptiveAvgPool2d(size) for NHWC x: bin i spans [floor(i H / s), ceil((i + 1) H / s))."""
    h, w = x.shape[1:3]
    rows = [(i * h // size, -(-(i + 1) * h // size)) for i in range(size)]
    cols = [(j * w // size, -(-(j + 1) * w // size)) for j in range(size)]
    return jnp.stack([jnp.stack([x[:, a:b, c:d].astype(jnp.float32).mean((1, 2)).astype(x.dtype)
                                 for c, d in cols], 1) for a, b in rows], 1)


def classifier(num_classes: int, dtype: Any) -> nn.Conv:
    """A head's last layer (a 1x1 conv named 'classifier'), made in the calling module's scope."""
    return nn.Conv(num_classes, (1, 1), dtype=dtype, name="classifier")


class UperHead(nn.Module):
    """UPerNet (transformers' BeitUperHead): PSP on the last map, FPN over all four."""
    num_classes: int
    channels: int
    pool_scales: Tuple[int, ...] = (1, 2, 3, 6)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, maps: Sequence[Any], train: bool = False):
        conv = lambda name, k, p=0: ConvBN(self.channels, k, p, dtype=self.dtype, name=name)  # noqa: E731
        top = maps[-1]
        size = top.shape[1:3]
        psp = [resize_bilinear(conv(f"psp_modules_{i}", 1)(adaptive_avg_pool(top, s), train), size)
               for i, s in enumerate(self.pool_scales)]
        laterals = [conv(f"lateral_convs_{i}", 1)(m, train) for i, m in enumerate(maps[:-1])]
        laterals.append(conv("bottleneck", 3, 1)(jnp.concatenate([top, *psp], axis=-1), train))
        for i in range(len(laterals) - 1, 0, -1):  # top-down
            laterals[i - 1] = laterals[i - 1] + resize_bilinear(laterals[i], laterals[i - 1].shape[1:3])
        outs = [conv(f"fpn_convs_{i}", 3, 1)(laterals[i], train) for i in range(len(laterals) - 1)]
        outs.append(laterals[-1])
        outs = [outs[0]] + [resize_bilinear(o, outs[0].shape[1:3]) for o in outs[1:]]
        x = conv("fpn_bottleneck", 3, 1)(jnp.concatenate(outs, axis=-1), train)
        return classifier(self.num_classes, self.dtype)(x)


class FCNHead(nn.Module):
    """The auxiliary head (transformers' BeitFCNHead) on map `in_index`."""
    num_classes: int
    channels: int
    num_convs: int = 1
    concat_input: bool = False
    in_index: int = 2
    kernel: int = 3
    dilation: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, maps: Sequence[Any], train: bool = False):
        residual = x = maps[self.in_index]
        pad = (self.kernel // 2) * self.dilation
        for i in range(self.num_convs):
            x = ConvBN(self.channels, self.kernel, pad, self.dilation, dtype=self.dtype, name=f"convs_{i}")(x, train)
        if self.concat_input:
            x = ConvBN(self.channels, self.kernel, self.kernel // 2, dtype=self.dtype,
                       name="conv_cat")(jnp.concatenate([residual, x], axis=-1), train)
        return classifier(self.num_classes, self.dtype)(x)


@dataclasses.dataclass(frozen=True)
class SegConfig:
    """What a `BeitForSemanticSegmentation` config.json says, in the fields the model uses."""
    num_labels: int = 150
    image_size: int = 640
    patch_size: int = 16
    num_channels: int = 3
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    layer_norm_eps: float = HF_LAYER_NORM_EPS
    layer_scale_init_value: float = 0.1
    use_absolute_position_embeddings: bool = False
    use_relative_position_bias: bool = True
    use_shared_relative_position_bias: bool = False
    drop_path_rate: float = 0.1
    out_indices: Tuple[int, ...] = (3, 5, 7, 11)
    pool_scales: Tuple[int, ...] = (1, 2, 3, 6)
    use_auxiliary_head: bool = True
    auxiliary_loss_weight: float = 0.4
    auxiliary_channels: int = 256
    auxiliary_num_convs: int = 1
    auxiliary_concat_input: bool = False
    semantic_loss_ignore_index: int = 255
    hidden_act: str = "gelu"
    id2label: Optional[Tuple[Tuple[int, str], ...]] = None  # (index, name) pairs: hashable, as a module field must be

    @property
    def label_names(self) -> Dict[int, str]:
        """{class index: name} (transformers' id2label; LABEL_i where the config names none)."""
        return dict(self.id2label) if self.id2label else {i: f"LABEL_{i}" for i in range(self.num_labels)}

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any], where: str = "config.json") -> "SegConfig":
        if cfg.get("model_type", "beit") != "beit":
            raise ValueError(f"{where}: model_type {cfg.get('model_type')!r} is not a BEiT (expected 'beit')")
        if cfg.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"{where}: hidden_act {cfg['hidden_act']!r}: beit-jax's BEiT uses exact GELU only")
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in cfg.items() if k in fields}
        for k in ("out_indices", "pool_scales"):
            if k in kw:
                kw[k] = tuple(int(i) for i in kw[k])
        if kw.get("id2label"):
            kw["id2label"] = tuple(sorted((int(k), str(v)) for k, v in kw["id2label"].items()))
            kw.setdefault("num_labels", len(kw["id2label"]))
        else:
            kw.pop("id2label", None)
        out = cls(**kw)
        if len(out.out_indices) != 4:
            raise ValueError(f"{where}: out_indices must name 4 hidden states (got {list(out.out_indices)})")
        if out.intermediate_size % out.hidden_size:
            raise ValueError(f"{where}: intermediate_size {out.intermediate_size} is not a multiple of hidden_size "
                             f"{out.hidden_size}")
        return out

    def to_hf(self) -> Dict[str, Any]:
        """A config.json transformers' BeitForSemanticSegmentation.from_pretrained reads."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["out_indices"], d["pool_scales"] = list(self.out_indices), list(self.pool_scales)
        labels = self.label_names
        d["id2label"] = {str(k): v for k, v in labels.items()}
        d["label2id"] = {v: int(k) for k, v in labels.items()}
        return dict(d, model_type="beit", architectures=["BeitForSemanticSegmentation"], use_mask_token=False,
                    use_mean_pooling=True, attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)


class BeitSegmenter(nn.Module):
    """BEiT + FPN + UPerNet (+ auxiliary FCN). NHWC normalised images in.

    `apply(variables, x)` -> logits (B, H/4, W/4, classes), transformers' `logits` in NHWC;
    `method="predict"` -> (B, H, W) int32 labels (logits resized bilinearly to the input, then
    argmax, as transformers' post_process_semantic_segmentation); `method="forward_aux"` ->
    (logits, auxiliary logits or None). `train=True` uses batch statistics (mutable
    'batch_stats') and dropout / drop-path (rng 'dropout').
    """
    config: SegConfig
    dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        self.backbone = SegmentationBackbone(
            img_size=c.image_size, patch_size=c.patch_size, in_chans=c.num_channels, num_classes=0,
            embed_dim=c.hidden_size, depth=c.num_hidden_layers, num_heads=c.num_attention_heads,
            mlp_ratio=c.intermediate_size / c.hidden_size, qkv_bias=True,
            init_values=c.layer_scale_init_value if c.layer_scale_init_value > 0 else None,
            use_abs_pos_emb=c.use_absolute_position_embeddings, use_rel_pos_bias=c.use_relative_position_bias,
            use_shared_rel_pos_bias=c.use_shared_relative_position_bias, norm_eps=c.layer_norm_eps,
            drop_path_rate=c.drop_path_rate, micro_batch=None, dtype=self.dtype)
        d = c.hidden_size
        deconv = lambda name: nn.ConvTranspose(d, (2, 2), strides=(2, 2), padding="VALID", dtype=self.dtype,  # noqa: E731
                                               name=name)
        self.fpn1_0, self.fpn1_3, self.fpn2_0 = deconv("fpn1_0"), deconv("fpn1_3"), deconv("fpn2_0")
        self.fpn1_1 = nn.BatchNorm(momentum=BN_MOMENTUM, epsilon=BN_EPS, dtype=self.dtype, name="fpn1_1")
        self.decode_head = UperHead(c.num_labels, d, c.pool_scales, dtype=self.dtype)
        if c.use_auxiliary_head:
            self.auxiliary_head = FCNHead(c.num_labels, c.auxiliary_channels, c.auxiliary_num_convs,
                                          c.auxiliary_concat_input, dtype=self.dtype)

    def feature_maps(self, x, train: bool = False):
        """The four FPN outputs (x4, x2, x1, x0.5 of the patch grid), NHWC."""
        c = self.config
        hs = self.backbone.hidden_states(x, deterministic=not train)
        b, grid = x.shape[0], x.shape[1] // c.patch_size
        return self._fpn([hs[i - 1][:, 1:].reshape(b, grid, grid, c.hidden_size) for i in c.out_indices], train)

    def _fpn(self, maps, train: bool):
        up4 = self.fpn1_3(nn.gelu(self.fpn1_1(self.fpn1_0(maps[0]), use_running_average=not train),
                                  approximate=False))
        down = nn.max_pool(maps[3], (2, 2), strides=(2, 2))
        return [up4, self.fpn2_0(maps[1]), maps[2], down]

    def _heads(self, maps, train: bool):
        aux = self.auxiliary_head(maps, train) if self.config.use_auxiliary_head else None
        return self.decode_head(maps, train), aux

    def forward_aux(self, x, train: bool = False):
        return self._heads(self.feature_maps(x, train), train)

    def init_heads(self):
        """Everything but the backbone, fed zero block outputs of its shapes: init(method=...) of this
        creates the FPN and heads' variables without tracing the backbone."""
        c = self.config
        grid = c.image_size // c.patch_size
        return self._heads(self._fpn([jnp.zeros((1, grid, grid, c.hidden_size), self.dtype)] * 4, False), False)

    def __call__(self, x, train: bool = False):
        return self.decode_head(self.feature_maps(x, train), train)

    def predict(self, x):
        logits = self(x).astype(jnp.float32)
        return jnp.argmax(resize_bilinear(logits, x.shape[1:3]), axis=-1).astype(jnp.int32)


def abstract_segmenter_variables(model: BeitSegmenter):
    """The variables' shapes (jax.ShapeDtypeStruct), without computing anything."""
    c = model.config
    x = jax.ShapeDtypeStruct((1, c.image_size, c.image_size, c.num_channels), jnp.float32)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(x.shape, x.dtype),
                                             method=BeitSegmenter.forward_aux))


def init_segmenter(model: BeitSegmenter, rng: int | jax.Array = 0) -> Dict[str, Any]:
    c = model.config
    key = prng_key(rng)
    x = jnp.zeros((1, c.image_size, c.image_size, c.num_channels), jnp.float32)
    return jax.jit(lambda k: model.init(k, x, method=BeitSegmenter.forward_aux))(key)


def init_heads(model: BeitSegmenter, rng: int | jax.Array = 0) -> Dict[str, Any]:
    """The variables of everything but the backbone (FPN, UPerNet, auxiliary head), equal to what
    init_segmenter(model, rng) gives them (flax draws each parameter's key from the root key and its
    path), without tracing or compiling the backbone's init: for a new segmenter on trained weights."""
    key = prng_key(rng)
    return jax.jit(lambda k: model.init(k, method=BeitSegmenter.init_heads))(key)


class _Classifier(nn.Module):
    num_classes: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        return classifier(self.num_classes, self.dtype)(x)


class _Classifiers(nn.Module):
    """The heads' two classifiers alone, at their paths in BeitSegmenter: flax draws a parameter's
    init key from the root key and its path, so they init as in the whole model (without tracing it)."""
    config: SegConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self):
        c = self.config
        _Classifier(c.num_labels, self.dtype, name="decode_head")(jnp.zeros((1, 1, 1, c.hidden_size), self.dtype))
        if c.use_auxiliary_head:
            aux_in = c.auxiliary_channels if c.auxiliary_num_convs or c.auxiliary_concat_input else c.hidden_size
            _Classifier(c.num_labels, self.dtype, name="auxiliary_head")(jnp.zeros((1, 1, 1, aux_in), self.dtype))


def init_classifiers(model: BeitSegmenter, rng: int | jax.Array = 0) -> Dict[str, Any]:
    """{'params': {head: {'classifier': ...}}}: what init_segmenter(model, rng) gives them."""
    key = prng_key(rng)
    return _Classifiers(model.config, model.dtype).init(key)


# ---- registered segmenters ----------------------------------------------------------------------
SEGMENTATION_MODELS = {  # name -> (HF repo, its config as published; pretrained=True reads the repo's own)
    "beit_base_upernet_640.ade20k": ("microsoft/beit-base-finetuned-ade-640-640", SegConfig()),
    "beit_large_upernet_640.ade20k": ("microsoft/beit-large-finetuned-ade-640-640", SegConfig(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
        layer_scale_init_value=1e-6, drop_path_rate=0.2, out_indices=(7, 11, 15, 23))),
}


def list_segmentation_models():
    return sorted(SEGMENTATION_MODELS)
