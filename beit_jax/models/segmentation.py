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

Weights: `from_hf_state_dict` reads the keys `save_pretrained` writes (the Hub checkpoints' names,
which transformers 4 and 5 both read and write), `to_hf_state_dict` writes them back. The backbone
goes through the timm mapping (`mapping.py`), so a timm BEiT can start a new segmenter.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

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
        return nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, name="classifier")(x)


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
        return nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, name="classifier")(x)


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
        maps = [hs[i - 1][:, 1:].reshape(b, grid, grid, c.hidden_size) for i in c.out_indices]
        up4 = self.fpn1_3(nn.gelu(self.fpn1_1(self.fpn1_0(maps[0]), use_running_average=not train),
                                  approximate=False))
        down = nn.max_pool(maps[3], (2, 2), strides=(2, 2))
        return [up4, self.fpn2_0(maps[1]), maps[2], down]

    def forward_aux(self, x, train: bool = False):
        maps = self.feature_maps(x, train)
        aux = self.auxiliary_head(maps, train) if self.config.use_auxiliary_head else None
        return self.decode_head(maps, train), aux

    def __call__(self, x, train: bool = False):
        return self.decode_head(self.feature_maps(x, train), train)

    def predict(self, x):
        logits = self(x).astype(jnp.float32)
        return jnp.argmax(resize_bilinear(logits, x.shape[1:3]), axis=-1).astype(jnp.int32)


# ---- weights: transformers' names <-> Flax --------------------------------------------------------
_BLOCK_HF_TO_TIMM = (
    ("attention.attention.query.bias", "attn.q_bias"),
    ("attention.attention.value.bias", "attn.v_bias"),
    ("attention.attention.relative_position_bias.relative_position_bias_table", "attn.relative_position_bias_table"),
    ("attention.output.dense.", "attn.proj."),
    ("layernorm_before.", "norm1."),
    ("layernorm_after.", "norm2."),
    ("intermediate.dense.", "mlp.fc1."),
    ("output.dense.", "mlp.fc2."),
    ("lambda_1", "gamma_1"),
    ("lambda_2", "gamma_2"),
)
_TOP_HF_TO_TIMM = (
    ("beit.embeddings.cls_token", "cls_token"),
    ("beit.embeddings.position_embeddings", "pos_embed"),
    ("beit.embeddings.patch_embeddings.projection.", "patch_embed.proj."),
    ("beit.encoder.relative_position_bias.relative_position_bias_table", "rel_pos_bias.relative_position_bias_table"),
)
_IGNORED = re.compile(r"(relative_position_index|num_batches_tracked|beit\.embeddings\.mask_token)$")
_BLOCK = re.compile(r"^beit\.encoder\.layer\.(\d+)\.(.+)$")
_BN = {"weight": ("params", "scale"), "bias": ("params", "bias"), "running_mean": ("batch_stats", "mean"),
       "running_var": ("batch_stats", "var")}
_BN_TO_HF = {v: k for k, v in _BN.items()}


def _backbone_to_timm(sd: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    out, qkv = {}, {}
    for k, v in sd.items():
        m = _BLOCK.match(k)
        if m:
            i, rest = m.groups()
            for part in ("query", "key", "value"):
                if rest == f"attention.attention.{part}.weight":
                    qkv.setdefault(i, {})[part] = v
                    break
            else:
                for hf, timm in _BLOCK_HF_TO_TIMM:
                    if rest.startswith(hf):
                        out[f"blocks.{i}.{timm}{rest[len(hf):]}"] = v
                        break
                else:
                    out[k] = v  # unknown: reported by the mapping as unexpected
            continue
        for hf, timm in _TOP_HF_TO_TIMM:
            if k.startswith(hf):
                out[timm + k[len(hf):]] = v
                break
        else:
            out[k] = v
    for i, parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise KeyError(f"block {i}: query/key/value weights incomplete (found {sorted(parts)})")
        out[f"blocks.{i}.attn.qkv.weight"] = np.concatenate([parts["query"], parts["key"], parts["value"]], 0)
    return out


def _head_path(key: str) -> Tuple[str, Tuple[str, ...]]:
    """A head key of transformers' checkpoint -> (collection, Flax path)."""
    parts = key.split(".")
    leaf = parts.pop()
    names, i = [], 0
    while i < len(parts):  # 'lateral_convs', '0' -> 'lateral_convs_0'; 'psp_modules', '0', '1' -> 'psp_modules_0'
        p = parts[i]
        if i + 1 < len(parts) and parts[i + 1].isdigit():
            names.append(f"{p}_{parts[i + 1]}")
            i += 3 if p == "psp_modules" else 2
        else:
            names.append(p)
            i += 1
    is_bn = names[-1] in ("bn", "fpn1_1")
    if is_bn:
        coll, flax_leaf = _BN[leaf]
    else:
        coll, flax_leaf = "params", {"weight": "kernel", "bias": "bias"}[leaf]
    return coll, tuple(names) + (flax_leaf,)


def _head_value(path: Tuple[str, ...], v: np.ndarray) -> np.ndarray:
    if path[-1] != "kernel":
        return v
    if path[0] in ("fpn1_0", "fpn1_3", "fpn2_0"):  # ConvTranspose2d (in, out, kh, kw) -> (kh, kw, in, out), flipped
        return np.ascontiguousarray(v.transpose(2, 3, 0, 1)[::-1, ::-1])
    return np.ascontiguousarray(v.transpose(2, 3, 1, 0))  # Conv2d (out, in, kh, kw) -> (kh, kw, in, out)


def from_hf_state_dict(sd: Mapping[str, Any], model: BeitSegmenter, where: str = "checkpoint") -> Dict[str, Any]:
    """transformers' BeitForSemanticSegmentation state dict -> Flax variables of `model`.
    Every key must find its place and every parameter must be filled, with its shape; otherwise
    a CheckpointMismatchError lists what is missing, unexpected or misshapen."""
    from ..mapping import CheckpointMismatchError, convert_timm_state_dict

    sd = {k: np.asarray(v) for k, v in sd.items() if not _IGNORED.search(k)}
    backbone = {k: v for k, v in sd.items() if k.startswith("beit.")}
    head = {k: v for k, v in sd.items() if not k.startswith("beit.")}
    try:
        bb = convert_timm_state_dict(_backbone_to_timm(backbone), model.bind({}).backbone.clone(parent=None),
                                     resize=True)
    except CheckpointMismatchError as e:
        raise CheckpointMismatchError(f"{where}: the BEiT backbone does not fit: {e}") from e
    variables: Dict[str, Any] = {"params": {"backbone": bb["params"]}, "batch_stats": {}}
    flat: Dict[Tuple[str, ...], Any] = {}
    unexpected = []
    for k, v in head.items():
        try:
            coll, path = _head_path(k)
        except (KeyError, IndexError):
            unexpected.append(k)
            continue
        flat[(coll,) + path] = _head_value(path, v)
    expected = traverse_util.flatten_dict(dict(abstract_segmenter_variables(model)))
    expected = {p: s for p, s in expected.items() if p[:2] != ("params", "backbone")}
    missing = sorted(".".join(p) for p in expected if p not in flat)
    unexpected += sorted(".".join(p) for p in flat if p not in expected)
    shapes = sorted(f"{'.'.join(p)}: checkpoint {flat[p].shape}, model {expected[p].shape}" for p in expected
                    if p in flat and tuple(flat[p].shape) != tuple(expected[p].shape))
    if missing or unexpected or shapes:
        raise CheckpointMismatchError(f"{where} does not fit the segmenter ({model.config.num_labels} classes, width "
                                      f"{model.config.hidden_size}): missing {missing[:8]}, unexpected "
                                      f"{unexpected[:8]}, shape mismatches {shapes[:8]}")
    for p, v in flat.items():
        variables.setdefault(p[0], {})
        node = variables[p[0]]
        for name in p[1:-1]:
            node = node.setdefault(name, {})
        node[p[-1]] = v
    return variables


def to_hf_state_dict(variables: Mapping[str, Any], model: BeitSegmenter) -> Dict[str, np.ndarray]:
    """Flax variables -> the state dict `save_pretrained` writes (numpy)."""
    from ..mapping import to_timm_state_dict

    backbone = model.bind({}).backbone.clone(parent=None)
    timm = to_timm_state_dict({"params": variables["params"]["backbone"]}, backbone)
    out: Dict[str, np.ndarray] = {}
    inv_top = [(t, h) for h, t in _TOP_HF_TO_TIMM]
    inv_block = [(t, h) for h, t in _BLOCK_HF_TO_TIMM]
    for k, v in timm.items():
        m = re.match(r"^blocks\.(\d+)\.(.+)$", k)
        if m:
            i, rest = m.groups()
            if rest == "attn.qkv.weight":
                for part, w in zip(("query", "key", "value"), np.split(v, 3, axis=0)):
                    out[f"beit.encoder.layer.{i}.attention.attention.{part}.weight"] = w
                continue
            hf = next(h + rest[len(t):] for t, h in inv_block if rest.startswith(t))
            out[f"beit.encoder.layer.{i}.{hf}"] = v
            continue
        out[next(h + k[len(t):] for t, h in inv_top if k.startswith(t))] = v
    for coll in ("params", "batch_stats"):
        for path, v in traverse_util.flatten_dict(dict(variables.get(coll, {}))).items():
            if path[0] == "backbone":
                continue
            out[_hf_key(coll, path)] = _hf_value(path, np.asarray(v))
    for k in [k for k in out if k.endswith(".running_var")]:
        out[k[: -len("running_var")] + "num_batches_tracked"] = np.zeros((), np.int64)
    return out


def _hf_key(coll: str, path: Tuple[str, ...]) -> str:
    names = []
    for p in path[:-1]:
        m = re.match(r"^(psp_modules|lateral_convs|fpn_convs|convs)_(\d+)$", p) or re.match(r"^(fpn[12])_(\d)$", p)
        if m and m.group(1) == "psp_modules":
            names += [m.group(1), m.group(2), "1"]
        elif m:
            names += [m.group(1), m.group(2)]
        else:
            names.append(p)
    if path[-2] in ("bn", "fpn1_1"):
        leaf = _BN_TO_HF[(coll, path[-1])]
    else:
        leaf = {"kernel": "weight", "bias": "bias"}[path[-1]]
    return ".".join(names + [leaf])


def _hf_value(path: Tuple[str, ...], v: np.ndarray) -> np.ndarray:
    if path[-1] != "kernel":
        return v
    if path[0] in ("fpn1_0", "fpn1_3", "fpn2_0"):
        return np.ascontiguousarray(v[::-1, ::-1].transpose(2, 3, 0, 1))
    return np.ascontiguousarray(v.transpose(3, 2, 0, 1))


def abstract_segmenter_variables(model: BeitSegmenter):
    """The variables' shapes (jax.ShapeDtypeStruct), without computing anything."""
    c = model.config
    x = jax.ShapeDtypeStruct((1, c.image_size, c.image_size, c.num_channels), jnp.float32)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(x.shape, x.dtype),
                                             method=BeitSegmenter.forward_aux))


def init_segmenter(model: BeitSegmenter, rng: int | jax.Array = 0) -> Dict[str, Any]:
    c = model.config
    key = jax.random.PRNGKey(rng) if isinstance(rng, int) else rng
    x = jnp.zeros((1, c.image_size, c.image_size, c.num_channels), jnp.float32)
    return jax.jit(lambda k: model.init(k, x, method=BeitSegmenter.forward_aux))(key)


# ---- loading: registered names, local folders, timm backbones -------------------------------------
SEGMENTATION_MODELS = {  # name -> (HF repo, its config as published; pretrained=True reads the repo's own)
    "beit_base_upernet_640.ade20k": ("microsoft/beit-base-finetuned-ade-640-640", SegConfig()),
    "beit_large_upernet_640.ade20k": ("microsoft/beit-large-finetuned-ade-640-640", SegConfig(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
        layer_scale_init_value=1e-6, drop_path_rate=0.2, out_indices=(7, 11, 15, 23))),
}
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def list_segmentation_models():
    return sorted(SEGMENTATION_MODELS)


def read_hf_folder(path: str) -> Tuple[Dict[str, Any], Dict[str, np.ndarray], str]:
    """(config.json, state dict, weights file) of a `save_pretrained` folder."""
    from ..checkpoints import load_state_dict_file

    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path}: no config.json: a segmentation folder is what transformers' "
                                f"save_pretrained writes (config.json + model.safetensors or pytorch_model.bin)")
    with open(cfg_path) as f:
        cfg = json.load(f)
    weights = next((os.path.join(path, n) for n in HF_WEIGHT_FILES if os.path.isfile(os.path.join(path, n))), None)
    if weights is None:
        raise FileNotFoundError(f"{path}: neither {' nor '.join(HF_WEIGHT_FILES)} is there")
    return cfg, load_state_dict_file(weights), weights


def _download(repo: str) -> str:
    from huggingface_hub import hf_hub_download

    from ..hub import PretrainedUnavailableError

    try:
        cfg = hf_hub_download(repo_id=repo, filename="config.json")
        for name in HF_WEIGHT_FILES:
            try:
                hf_hub_download(repo_id=repo, filename=name)
                break
            except Exception:  # noqa: BLE001 - the other name may be there
                if name == HF_WEIGHT_FILES[-1]:
                    raise
        return os.path.dirname(cfg)
    except Exception as e:
        raise PretrainedUnavailableError(
            f"could not get {repo} from the Hugging Face Hub or its cache ({type(e).__name__}: {e}). Connect to "
            f"the Hub once (the files are then cached under HF_HOME), or download the repo and pass its folder "
            f"to create_segmentation_model") from e


def create_segmentation_model(name_or_path: str, pretrained: bool = False, *, num_classes: Optional[int] = None,
                              img_size: Optional[int] = None, dtype=jnp.float32, rng: int | jax.Array = 0,
                              checkpoint_path: Optional[str] = None, backbone_kwargs: Optional[Dict[str, Any]] = None,
                              **overrides) -> Tuple[BeitSegmenter, Dict[str, Any]]:
    """A BEiT + UPerNet segmenter and its variables: `(module, variables)`.

    name_or_path:
      - a registered name (`list_segmentation_models()`: beit_base_upernet_640.ade20k,
        beit_large_upernet_640.ade20k); pretrained=True fetches its transformers checkpoint (config.json
        and weights) through huggingface_hub's cache, as classifiers do;
      - a local folder holding a BeitForSemanticSegmentation checkpoint as save_pretrained writes it;
        its config.json decides every architecture detail;
      - a timm BEiT classifier name (`beit_base_patch16_224`, `beitv2_base_patch16_224.in1k_ft_in22k_in1k`, ...):
        a new segmenter on that backbone (pretrained=True loads the timm weights, relative position
        tables resized to img_size; or checkpoint_path, a timm checkpoint file) with a fresh FPN /
        UPerNet / auxiliary head of num_classes, out_indices at the quarters of its depth;
        backbone_kwargs go to `create_model` (depth=..., ...).
    num_classes / img_size / overrides (SegConfig fields) change the architecture; a new head size
    starts that head fresh (with a warning), as create_model does.
    """
    import warnings

    from ..models import ARCHITECTURES, split_model_name

    path = os.fspath(name_or_path)
    if checkpoint_path is not None and (os.path.isdir(path) or path in SEGMENTATION_MODELS):
        raise ValueError("checkpoint_path is for a timm backbone name; a segmenter's own weights come from its "
                         "folder or, with pretrained=True, its Hub repo")
    if os.path.isdir(path) or path in SEGMENTATION_MODELS:
        if os.path.isdir(path):
            hf_cfg, sd, where = read_hf_folder(path)
        elif pretrained:
            hf_cfg, sd, where = read_hf_folder(_download(SEGMENTATION_MODELS[path][0]))
        else:
            hf_cfg, sd, where = SEGMENTATION_MODELS[path][1].to_hf(), None, path
        cfg = SegConfig.from_hf(hf_cfg, where=os.path.join(path, "config.json") if os.path.isdir(path) else path)
        cfg = _override(cfg, num_classes, img_size, overrides)
        model = BeitSegmenter(cfg, dtype=dtype)
        if sd is None:
            return model, init_segmenter(model, rng)
        if cfg.num_labels != SegConfig.from_hf(hf_cfg).num_labels:
            warnings.warn(f"{where}: its heads have {SegConfig.from_hf(hf_cfg).num_labels} classes; num_classes="
                          f"{cfg.num_labels} starts the decode and auxiliary classifiers fresh", UserWarning,
                          stacklevel=2)
            sd = {k: v for k, v in sd.items() if not re.match(r"^(decode_head|auxiliary_head)\.classifier\.", k)}
            fresh = init_segmenter(model, rng)
            loaded = _from_hf_allowing_classifiers(sd, model, where, fresh)
            return model, loaded
        return model, from_hf_state_dict(sd, model, where)
    arch, _ = split_model_name(path)
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown segmentation model {path!r}: use a folder written by save_pretrained, one of "
                         f"{list_segmentation_models()}, or a timm BEiT name ({', '.join(sorted(ARCHITECTURES)[:4])}, ...)")
    return _from_timm_backbone(path, pretrained, checkpoint_path, num_classes, img_size, dtype, rng, overrides,
                               backbone_kwargs or {})


def _override(cfg: SegConfig, num_classes, img_size, overrides) -> SegConfig:
    bad = sorted(set(overrides) - {f.name for f in dataclasses.fields(SegConfig)})
    if bad:
        raise TypeError(f"unknown segmenter settings {bad}: they are SegConfig's fields "
                        f"({', '.join(f.name for f in dataclasses.fields(SegConfig))})")
    kw = dict(overrides)
    if num_classes is not None:
        kw.update(num_labels=num_classes, id2label=None if num_classes != cfg.num_labels else cfg.id2label)
    if img_size is not None:
        kw["image_size"] = img_size
    return dataclasses.replace(cfg, **kw)


def _from_hf_allowing_classifiers(sd, model, where, fresh):
    """Load all but the two classifiers, which keep their fresh values."""
    flat_fresh = traverse_util.flatten_dict(jax.tree_util.tree_map(np.asarray, dict(fresh)))
    for head in ("decode_head", "auxiliary_head"):
        if (("params", head, "classifier", "kernel")) in flat_fresh:
            k = flat_fresh[("params", head, "classifier", "kernel")]
            sd[f"{head}.classifier.weight"] = k.transpose(3, 2, 0, 1)
            sd[f"{head}.classifier.bias"] = flat_fresh[("params", head, "classifier", "bias")]
    return from_hf_state_dict(sd, model, where)


def _from_timm_backbone(name, pretrained, checkpoint_path, num_classes, img_size, dtype, rng, overrides, kwargs):
    """A new segmenter whose backbone is a timm BEiT (its weights when pretrained)."""
    from ..factory import create_model

    if num_classes is None:
        raise ValueError(f"a new segmenter on {name} needs num_classes (its heads start fresh)")
    size = img_size or 512
    clf, clf_vars = create_model(name, pretrained=pretrained, img_size=size, checkpoint_path=checkpoint_path,
                                 **kwargs)  # its own head (unused): the weights load whole, as checked
    if not clf.use_rel_pos_bias and not clf.use_shared_rel_pos_bias and not clf.use_abs_pos_emb:
        raise ValueError(f"{name} has no position information to segment with")
    depth = clf.depth
    # out_indices at the quarters of the depth, as the published configs space them ([3, 6, 9, 12] of 12:
    # transformers takes hidden_states[i - 1], so blocks 1, 4, 7, 10; it accepts indices 0..depth only)
    quarter = [depth * k // 4 for k in (1, 2, 3, 4)]
    if len(set(quarter)) < 4 or min(quarter) < 1:
        raise ValueError(f"{name} has {depth} blocks: a segmenter takes 4 different block outputs, so it needs 4 or more")
    cfg = SegConfig(num_labels=num_classes, image_size=size, patch_size=clf.patch_size, num_channels=clf.in_chans,
                    hidden_size=clf.embed_dim, num_hidden_layers=depth, num_attention_heads=clf.num_heads,
                    intermediate_size=int(clf.embed_dim * clf.mlp_ratio), layer_norm_eps=clf.norm_eps,
                    layer_scale_init_value=clf.init_values or 0.0, use_absolute_position_embeddings=clf.use_abs_pos_emb,
                    use_relative_position_bias=clf.use_rel_pos_bias,
                    use_shared_relative_position_bias=clf.use_shared_rel_pos_bias,
                    out_indices=tuple(quarter), auxiliary_channels=256)
    cfg = _override(cfg, None, None, overrides)
    model = BeitSegmenter(cfg, dtype=dtype)
    variables = jax.tree_util.tree_map(np.asarray, dict(init_segmenter(model, rng)))
    params = dict(variables["params"])
    backbone = {k: v for k, v in clf_vars["params"].items() if k in params["backbone"]}
    missing = sorted(set(params["backbone"]) - set(backbone))
    if missing:
        raise ValueError(f"{name}'s weights lack {missing} for the segmentation backbone")
    params["backbone"] = backbone
    return model, dict(variables, params=params)


def save_hf_folder(path: str, model: BeitSegmenter, variables: Mapping[str, Any]) -> str:
    """Write `path/config.json` + `path/model.safetensors` as transformers' save_pretrained does, so
    `BeitForSemanticSegmentation.from_pretrained(path)` loads them. Refuses a folder that already
    holds a model it did not write."""
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    for n in ("config.json", *HF_WEIGHT_FILES):
        if os.path.exists(os.path.join(path, n)):
            raise FileExistsError(f"{path} already holds {n}: choose an empty folder (nothing is overwritten)")
    sd = to_hf_state_dict(variables, model)
    save_file({k: np.ascontiguousarray(v) if v.ndim else v for k, v in sd.items()}, os.path.join(path, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(model.config.to_hf(), f, indent=2)
    return path
