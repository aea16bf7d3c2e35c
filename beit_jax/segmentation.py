"""Semantic segmentation above the model: loading (transformers' BeitForSemanticSegmentation
folders and Hub repos, timm backbones), export back to transformers, and whole-image inference.
The modules themselves are `models/segmentation.py`.

Weights: `from_hf_state_dict` reads the keys `save_pretrained` writes (the Hub checkpoints'
names, which transformers 4 and 5 both read and write), `to_hf_state_dict` writes them back. The
backbone goes through the timm mapping (`mapping.py`), so a timm BEiT can start a new segmenter.

Inference on whole images, the modes of mmseg and transformers:

- `whole` (transformers' image processor and post-processing): the image squashed to the
  model's size, logits resized back to the image (bilinear), argmax.
- `slide` (mmseg's `slide_inference`, unilm's ADE20K test setting): the image resized so its
  short side is the model's size (aspect kept), then crops of the model's size every `stride`
  pixels (default 2/3 of the crop, unilm's 426 for 640) whose logits, upsampled to the crop,
  are summed and divided by how many crops cover each pixel; a side shorter than the crop is
  padded (the pad is cut off again).
- `flip`: the logits of the mirrored image, mirrored back, are added (mmseg's flip test).

Label maps are the model's class indices (transformers' `id2label` keys); for the ADE20K
checkpoints index i is ADE20K class i + 1 (they were trained with reduce_labels). PNGs are
palette images ('P' mode), readable by any tool, with `palette()`'s colours.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import warnings
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from PIL import Image

from .checkpoints import load_state_dict_file, save_safetensors
from .factory import create_model
from .hub import PretrainedUnavailableError
from .mapping import CheckpointMismatchError, convert_timm_state_dict, to_timm_state_dict
from .models import ARCHITECTURES, split_model_name
from .models.segmentation import (SEGMENTATION_MODELS, BeitSegmenter, SegConfig, abstract_segmenter_variables,
                                  init_classifiers, init_heads, init_segmenter, list_segmentation_models,
                                  resize_bilinear)
from .transforms import normalize

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


HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def read_hf_folder(path: str) -> Tuple[Dict[str, Any], Dict[str, np.ndarray], str]:
    """(config.json, state dict, weights file) of a `save_pretrained` folder."""
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
            f"the Hub once (the files are then cached under HF_HOME), or copy the repo's files (config.json and "
            f"model.safetensors) into a folder and pass that folder as the model (`name_or_path`)") from e


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
        published = SegConfig.from_hf(hf_cfg, where=os.path.join(path, "config.json") if os.path.isdir(path) else path)
        cfg = _override(published, num_classes, img_size, overrides)
        model = BeitSegmenter(cfg, dtype=dtype)
        if sd is None:
            return model, init_segmenter(model, rng)
        if cfg.num_labels != published.num_labels:
            warnings.warn(f"{where}: its heads have {published.num_labels} classes; num_classes={cfg.num_labels} "
                          f"starts the decode and auxiliary classifiers fresh", UserWarning, stacklevel=2)
            sd = dict(sd, **_fresh_classifiers(model, rng))
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


def _fresh_classifiers(model: BeitSegmenter, rng) -> Dict[str, np.ndarray]:
    """The two classifiers of a fresh init, as the state dict entries that replace a checkpoint's."""
    flat = traverse_util.flatten_dict(jax.tree_util.tree_map(np.asarray, dict(init_classifiers(model, rng)["params"])))
    return {_hf_key("params", p): _hf_value(p, v) for p, v in flat.items()}


def _from_timm_backbone(name, pretrained, checkpoint_path, num_classes, img_size, dtype, rng, overrides, kwargs):
    """A new segmenter whose backbone is a timm BEiT (its weights when pretrained)."""
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
    # the backbone's variables are the classifier's (trained or fresh); only the FPN and heads are
    # initialised (as a whole init would, without tracing and compiling the backbone's init again)
    heads = jax.tree_util.tree_map(np.asarray, dict(init_heads(model, rng)))
    layout = abstract_segmenter_variables(model)
    backbone = {k: v for k, v in clf_vars["params"].items() if k in layout["params"]["backbone"]}
    missing = sorted(set(layout["params"]["backbone"]) - set(backbone))
    if missing:
        raise ValueError(f"{name}'s weights lack {missing} for the segmentation backbone")
    params = {k: backbone if k == "backbone" else heads["params"][k] for k in layout["params"]}
    return model, dict(heads, params=params)


def save_hf_folder(path: str, model: BeitSegmenter, variables: Mapping[str, Any]) -> str:
    """Write `path/config.json` + `path/model.safetensors` as transformers' save_pretrained does, so
    `BeitForSemanticSegmentation.from_pretrained(path)` loads them. Refuses a folder that already
    holds a model it did not write."""
    os.makedirs(path, exist_ok=True)
    for n in ("config.json", *HF_WEIGHT_FILES):
        if os.path.exists(os.path.join(path, n)):
            raise FileExistsError(f"{path} already holds {n}: choose an empty folder (nothing is overwritten)")
    sd = to_hf_state_dict(variables, model)
    save_safetensors(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(model.config.to_hf(), f, indent=2)
    return path


# ---- inference on whole images ------------------------------------------------------------
MODES = ("whole", "slide")
SEG_MEAN = SEG_STD = (0.5, 0.5, 0.5)  # BeitImageProcessor's for the ADE20K checkpoints


def palette(n: int = 256) -> np.ndarray:
    """(n, 3) uint8 colours: PASCAL VOC's bit-interleaved palette (0 is black; neighbours differ)."""
    out = np.zeros((n, 3), np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out[i] = (r, g, b)
    return out


@functools.lru_cache(maxsize=8)
def _logits_fn(model):
    return jax.jit(lambda v, x: model.apply(v, x).astype(jnp.float32))


def _upsample(logits: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """(h, w, K) -> (H, W, K), as torch's bilinear interpolate(align_corners=False)."""
    return np.asarray(resize_bilinear(jnp.asarray(logits)[None], size)[0])


def crop_boxes(h: int, w: int, crop: int, stride: int) -> Sequence[Tuple[int, int, int, int]]:
    """mmseg's slide grid: (y1, x1, y2, x2) crops of at most crop x crop covering an h x w image."""
    rows = max(h - crop + stride - 1, 0) // stride + 1
    cols = max(w - crop + stride - 1, 0) // stride + 1
    boxes = []
    for i in range(rows):
        for j in range(cols):
            y2, x2 = min(i * stride + crop, h), min(j * stride + crop, w)
            boxes.append((max(y2 - crop, 0), max(x2 - crop, 0), y2, x2))
    return boxes


def device_runner(model, variables, parallel: str = "sharded"):
    """`run(crops)`: (n, S, S, 3) normalised crops -> (n, S/4, S/4, classes) float32 logits over
    every device of this process (`parallel.DataParallel`; n is padded to a multiple of the device
    count and the pad dropped). Pass it to segment / segment_logits as `runner`."""
    from .parallel import DataParallel

    dp = DataParallel(parallel)
    if dp.process_count > 1:
        raise ValueError("segmentation runs in one process (on all of its devices), not under jax.distributed")
    step = dp.inference_step(lambda v, x: model.apply(v, x).astype(jnp.float32))
    params = dp.replicate(variables)

    def run(x: np.ndarray) -> np.ndarray:
        n, pad = len(x), (-len(x)) % dp.num_devices
        if pad:
            x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
        return np.asarray(dp.fetch(step(params, dp.put_batch(x))))[:n]

    run.num_devices = dp.num_devices
    return run


def segment_logits(model, variables, image, mode: str = "whole", stride: Optional[int] = None, flip: bool = False,
                   mean=SEG_MEAN, std=SEG_STD, batch_size: int = 8, runner=None) -> np.ndarray:
    """(H, W, classes) float32 logits for one image (a PIL image or an (H, W, 3) uint8 array) at its
    own size, by `mode` (see the module docstring). runner: how batches of crops run (default: one
    jitted call on the default device; `device_runner(...)` for every device)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)} (got {mode!r})")
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))
    img = img.convert("RGB")
    size = model.config.image_size
    run = runner or (lambda x: np.asarray(_logits_fn(model)(variables, x)))
    if mode == "whole":
        x = normalize(np.asarray(img.resize((size, size), Image.BILINEAR)), mean, std)[None]
        xs = np.concatenate([x, x[:, :, ::-1]]) if flip else x
        out = run(xs)
        logits = out[0] + (out[1][:, ::-1] if flip else 0)
        return _upsample(logits, (img.height, img.width))
    stride = stride or max(1, (2 * size) // 3)
    if not 0 < stride <= size:
        raise ValueError(f"stride must be between 1 and the crop size {size} (got {stride})")
    scale = size / min(img.size)
    resized = img.resize((max(size, round(img.width * scale)), max(size, round(img.height * scale))), Image.BILINEAR)
    x = normalize(np.asarray(resized), mean, std)
    h, w = x.shape[:2]
    boxes = crop_boxes(h, w, size, stride)
    crops = []
    for y1, x1, y2, x2 in boxes:
        c = np.zeros((size, size, 3), np.float32)  # a short side is padded (0 = the mean colour)
        c[: y2 - y1, : x2 - x1] = x[y1:y2, x1:x2]
        crops.append(c)
    crops = np.stack(crops)
    if flip:
        crops = np.concatenate([crops, crops[:, :, ::-1]])
    outs = np.concatenate([run(crops[i:i + batch_size]) for i in range(0, len(crops), batch_size)])
    k = outs.shape[-1]
    total, count = np.zeros((h, w, k), np.float32), np.zeros((h, w, 1), np.float32)
    for n, (y1, x1, y2, x2) in enumerate(boxes):
        crop_logits = _upsample(outs[n], (size, size))
        if flip:
            crop_logits = crop_logits + _upsample(outs[len(boxes) + n], (size, size))[:, ::-1]
        total[y1:y2, x1:x2] += crop_logits[: y2 - y1, : x2 - x1]
        count[y1:y2, x1:x2] += 1
    return _upsample(total / count, (img.height, img.width))


def segment(model, variables, image, **kwargs) -> np.ndarray:
    """(H, W) int32 class indices for one image (see segment_logits for the arguments)."""
    return segment_logits(model, variables, image, **kwargs).argmax(-1).astype(np.int32)


def label_png(labels: np.ndarray) -> Image.Image:
    """A palette PNG of class indices (up to 256 classes: index = pixel value)."""
    if labels.max(initial=0) > 255:
        raise ValueError(f"class index {int(labels.max())} does not fit a palette PNG (256 classes at most)")
    out = Image.fromarray(labels.astype(np.uint8), mode="P")
    out.putpalette(palette().reshape(-1).tolist())
    return out


def overlay(image, labels: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """The image with each pixel's class colour blended in."""
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, np.float32)
    colours = palette()[labels].astype(np.float32)
    return Image.fromarray(np.clip((1 - alpha) * rgb + alpha * colours, 0, 255).astype(np.uint8))




__all__ = ["BeitSegmenter", "SegConfig", "create_segmentation_model", "list_segmentation_models", "from_hf_state_dict",
           "to_hf_state_dict", "read_hf_folder", "save_hf_folder", "MODES", "crop_boxes", "device_runner", "label_png",
           "overlay", "palette", "segment", "segment_logits"]
