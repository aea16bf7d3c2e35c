"""Semantic segmentation (BEiT + FPN + UPerNet): parity with transformers' PyTorch
BeitForSemanticSegmentation on perturbed random weights (BatchNorm statistics too), save_pretrained
folders both ways, registered names through the Hub cache, and a timm backbone starting a segmenter."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from flax import traverse_util
from PIL import Image

import beit_jax
from beit_jax.models.segmentation import SegConfig, init_heads, init_segmenter
from beit_jax.segmentation import create_segmentation_model, save_hf_folder
from tests.support import TINY, as_tensors, max_abs, sample_photos, subprocess_env, timm_model, timm_state_dict

# Two architectures transformers builds from config.json: base-like (per-block relative position
# tables, layer scale, out_indices 1..4), and another depth / grid / out_indices with a shared
# relative position table, absolute position embeddings, no layer scale and a 2-conv auxiliary
# head that concatenates its input.
CONFIGS = {
    "base-like": dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=64,
                      out_indices=[1, 2, 3, 4], use_relative_position_bias=True, layer_scale_init_value=0.1,
                      use_auxiliary_head=True, auxiliary_channels=16, num_labels=5),
    "shared-abs-96": dict(hidden_size=48, num_hidden_layers=6, num_attention_heads=3, intermediate_size=96,
                          image_size=96, out_indices=[2, 4, 5, 6], use_relative_position_bias=False,
                          use_shared_relative_position_bias=True, use_absolute_position_embeddings=True,
                          layer_scale_init_value=0.0, use_auxiliary_head=True, auxiliary_channels=8,
                          auxiliary_num_convs=2, auxiliary_concat_input=True, num_labels=7),
}


def hf_segmenter(name: str, seed: int = 0):
    """transformers' model for a config, every weight and BatchNorm statistic perturbed."""
    from transformers import BeitConfig, BeitForSemanticSegmentation

    torch.manual_seed(seed)
    model = BeitForSemanticSegmentation(BeitConfig(patch_size=16, **CONFIGS[name])).eval()
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(torch.randn_like(p) * 0.1)
        for n, b in model.named_buffers():
            if n.endswith("running_mean"):
                b.copy_(torch.randn_like(b) * 0.2)
            elif n.endswith("running_var"):
                b.copy_(torch.rand_like(b) + 0.5)
    return model


def photos(imagenet_dir, n: int, size: int) -> np.ndarray:
    """Real photos, resized and normalised as the ADE20K image processor does (mean = std = 0.5)."""
    arrays = [np.asarray(Image.open(p).convert("RGB").resize((size, size), Image.BILINEAR), np.float32)
              for p in sample_photos(imagenet_dir, n)]
    return (np.stack(arrays) / 255.0 - 0.5) / 0.5


def hf_outputs(model, x: np.ndarray):
    """(logits, auxiliary logits, labels at input size) of transformers' model, NHWC."""
    pixels = torch.from_numpy(x).permute(0, 3, 1, 2)
    with torch.no_grad():
        logits = model(pixels).logits
        # the auxiliary head's logits, from the feature maps as BeitForSemanticSegmentation.forward makes them
        hs = model.beit(pixels, output_hidden_states=True).hidden_states
        g = x.shape[1] // model.config.patch_size
        maps = tuple(hs[i - 1][:, 1:].transpose(1, 2).reshape(x.shape[0], -1, g, g) for i in model.config.out_indices)
        aux = model.auxiliary_head(model.fpn(maps))
        labels = torch.nn.functional.interpolate(logits, size=x.shape[1:3], mode="bilinear",
                                                 align_corners=False).argmax(1)
    nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()  # noqa: E731
    return nhwc(logits), nhwc(aux), labels.numpy()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_labels_and_auxiliary_logits_equal_transformers(name, imagenet_dir, tmp_path):
    hf = hf_segmenter(name)
    hf.save_pretrained(tmp_path / "hf")
    model, variables = create_segmentation_model(str(tmp_path / "hf"))
    assert model.config.out_indices == tuple(CONFIGS[name]["out_indices"])
    x = photos(imagenet_dir, 2, CONFIGS[name]["image_size"])
    ref_logits, ref_aux, ref_labels = hf_outputs(hf, x)

    # the three methods in one jitted program (eagerly, each op of the segmenter compiles on its own)
    logits, (logits_, aux), labels = jax.jit(lambda v, x: (
        model.apply(v, x), model.apply(v, x, method="forward_aux"), model.apply(v, x, method="predict")))(variables, x)
    logits, labels = np.asarray(logits), np.asarray(labels)
    assert logits.shape == ref_logits.shape == (2, x.shape[1] // 4, x.shape[2] // 4, CONFIGS[name]["num_labels"])
    assert max_abs(logits, ref_logits) < 1e-5 * max(1.0, np.abs(ref_logits).max()), max_abs(logits, ref_logits)
    assert max_abs(np.asarray(aux), ref_aux) < 1e-5 * max(1.0, np.abs(ref_aux).max())
    assert np.array_equal(np.asarray(logits_), logits)
    assert labels.shape == ref_labels.shape == (2, *x.shape[1:3]) and labels.dtype == np.int32
    assert (labels == ref_labels).mean() > 0.999  # a near tie may flip a pixel, nothing more


def test_hf_folder_round_trip_is_identical_in_transformers(tmp_path, imagenet_dir):
    """HF folder -> beit-jax -> HF folder: the same keys, and transformers gives identical logits."""
    from safetensors.numpy import load_file
    from transformers import BeitForSemanticSegmentation

    hf = hf_segmenter("shared-abs-96", seed=3)
    hf.save_pretrained(tmp_path / "hf")
    model, variables = create_segmentation_model(str(tmp_path / "hf"))
    save_hf_folder(str(tmp_path / "back"), model, variables)
    assert set(load_file(tmp_path / "back" / "model.safetensors")) == set(load_file(tmp_path / "hf" / "model.safetensors"))
    again = BeitForSemanticSegmentation.from_pretrained(tmp_path / "back").eval()
    x = torch.from_numpy(photos(imagenet_dir, 2, 96)).permute(0, 3, 1, 2)
    with torch.no_grad():
        assert torch.equal(again(x).logits, hf(x).logits)
    with pytest.raises(FileExistsError, match="already holds config.json: choose an empty folder"):
        save_hf_folder(str(tmp_path / "back"), model, variables)


def test_bad_folders_and_settings_are_named(tmp_path):
    hf = hf_segmenter("base-like")
    hf.save_pretrained(tmp_path / "hf")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        create_segmentation_model(str(tmp_path))
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps(dict(cfg, out_indices=[1, 2, 3])))
    with pytest.raises(ValueError, match=r"config.json: out_indices must name 4 hidden states"):
        create_segmentation_model(str(tmp_path / "hf"))
    (tmp_path / "hf" / "config.json").write_text(json.dumps(dict(cfg, hidden_size=64)))
    with pytest.raises(beit_jax.CheckpointMismatchError, match="does not fit"):
        create_segmentation_model(str(tmp_path / "hf"))
    with pytest.raises(TypeError, match="unknown segmenter settings \\['depth'\\]"):
        create_segmentation_model("beit_base_upernet_640.ade20k", depth=2)


def test_new_classes_start_fresh_classifiers_loudly(tmp_path, imagenet_dir):
    hf = hf_segmenter("base-like")
    hf.save_pretrained(tmp_path / "hf")
    with pytest.warns(UserWarning, match="its heads have 5 classes; num_classes=3 starts the decode and auxiliary "
                                         "classifiers fresh"):
        model, variables = create_segmentation_model(str(tmp_path / "hf"), num_classes=3)
    assert jax.jit(model.apply)(variables, photos(imagenet_dir, 1, 64)).shape == (1, 16, 16, 3)
    whole = init_segmenter(model, 0)
    fresh = whole["params"]  # the classifiers are a whole fresh init's (rng 0)
    for head in ("decode_head", "auxiliary_head"):
        for k in ("kernel", "bias"):
            assert np.array_equal(variables["params"][head]["classifier"][k], fresh[head]["classifier"][k]), (head, k)
    # so are the FPN's and heads' variables that a new segmenter on a timm backbone starts from
    heads = traverse_util.flatten_dict(dict(init_heads(model, 0)))
    expected = {k: v for k, v in traverse_util.flatten_dict(dict(whole)).items() if k[1] != "backbone"}
    assert heads.keys() == expected.keys() and all(np.array_equal(heads[k], expected[k]) for k in heads)
    full, full_vars = create_segmentation_model(str(tmp_path / "hf"))
    assert np.array_equal(variables["params"]["decode_head"]["fpn_bottleneck"]["conv"]["kernel"],
                          full_vars["params"]["decode_head"]["fpn_bottleneck"]["conv"]["kernel"])


def test_registered_names_load_through_the_hub_cache_offline(tmp_path, imagenet_dir):
    """pretrained=True fetches config.json and the weights of the registered repo through
    huggingface_hub (a cache built here, HF_HUB_OFFLINE=1); a cache without them says what to do."""
    hf = hf_segmenter("base-like", seed=5)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--microsoft--beit-base-finetuned-ade-640-640"
    hf.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    x = photos(imagenet_dir, 1, 64)
    np.save(tmp_path / "x.npy", x)
    code = ("import numpy as np, sys, beit_jax\n"
            "m, v = beit_jax.create_segmentation_model('beit_base_upernet_640.ade20k', pretrained=True)\n"
            f"np.save(r'{tmp_path / 'out.npy'}', np.asarray(m.apply(v, np.load(r'{tmp_path / 'x.npy'}'))))\n"
            "print('torch imported:', 'torch' in sys.modules)\n")
    env = subprocess_env(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"), HF_HOME=str(tmp_path / "home"))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "torch imported: False" in res.stdout
    ref = hf_outputs(hf, x)[0]
    assert max_abs(np.load(tmp_path / "out.npy"), ref) < 1e-5 * max(1.0, np.abs(ref).max())

    env["HF_HUB_CACHE"] = str(tmp_path / "empty")
    res = subprocess.run([sys.executable, "-c", "import beit_jax; beit_jax.create_segmentation_model("
                          "'beit_large_upernet_640.ade20k', pretrained=True)"], env=env, capture_output=True, text=True)
    assert res.returncode != 0 and "PretrainedUnavailableError" in res.stderr
    assert "microsoft/beit-large-finetuned-ade-640-640" in res.stderr


def test_registered_architectures_are_the_published_ones():
    """pretrained=False builds the published architecture without any download (only the
    config is checked here: a 640 px BEiT-L init is minutes of CPU)."""
    from beit_jax.models.segmentation import SEGMENTATION_MODELS

    assert beit_jax.list_segmentation_models() == ["beit_base_upernet_640.ade20k", "beit_large_upernet_640.ade20k"]
    base, large = (SEGMENTATION_MODELS[n][1] for n in beit_jax.list_segmentation_models())
    assert (base.hidden_size, base.num_hidden_layers, base.out_indices, base.image_size) == (768, 12, (3, 5, 7, 11), 640)
    assert (large.hidden_size, large.num_hidden_layers, large.out_indices) == (1024, 24, (7, 11, 15, 23))
    assert SegConfig.from_hf(base.to_hf()) == dataclasses.replace(base, id2label=tuple((i, f"LABEL_{i}")
                                                                                       for i in range(150)))


def test_a_timm_backbone_starts_a_segmenter_that_transformers_loads(tmp_path, imagenet_dir):
    """create_segmentation_model(<timm BEiT>, num_classes=K): the backbone is the timm model (its
    block outputs equal timm's forward_intermediates), the heads are new, out_indices sit at the
    quarters of its depth, and the export is a folder transformers loads with the same logits."""
    from safetensors.torch import save_file
    from transformers import BeitForSemanticSegmentation

    small = dict(depth=4, img_size=64, embed_dim=64, num_heads=2)
    tm = timm_model("beit_base_patch16_224", **small)
    save_file(as_tensors(timm_state_dict(tm)), tmp_path / "timm.safetensors")
    model, variables = create_segmentation_model("beit_base_patch16_224", num_classes=4, img_size=64,
                                                 checkpoint_path=str(tmp_path / "timm.safetensors"),
                                                 backbone_kwargs=dict(depth=4, embed_dim=64, num_heads=2))
    assert model.config.out_indices == (1, 2, 3, 4)  # hidden_states[0..3]: the embedding, blocks 0, 1, 2
    x = photos(imagenet_dir, 2, 64)
    hidden = jax.jit(lambda v, x: model.apply(v, x, method=lambda m, x: m.backbone.hidden_states(x)))(variables, x)
    with torch.no_grad():
        ref = tm.forward_intermediates(torch.from_numpy(x).permute(0, 3, 1, 2), intermediates_only=True)
    assert len(ref) == len(hidden) - 1 == 4
    for ours, theirs in zip(hidden[1:], ref):  # timm's maps are NCHW without the cls token
        assert max_abs(np.asarray(ours)[:, 1:], theirs.flatten(2).transpose(1, 2).numpy()) < 1e-5

    save_hf_folder(str(tmp_path / "hf"), model, variables)
    hf = BeitForSemanticSegmentation.from_pretrained(tmp_path / "hf").eval()
    ref_logits = hf_outputs(hf, x)[0]
    logits = np.asarray(jax.jit(model.apply)(variables, x))
    assert logits.shape == (2, 16, 16, 4)
    assert max_abs(logits, ref_logits) < 1e-5 * max(1.0, np.abs(ref_logits).max())
    with pytest.raises(ValueError, match="needs num_classes"):
        create_segmentation_model(TINY)
    with pytest.raises(ValueError, match="has 2 blocks: a segmenter takes 4 different block outputs"):
        create_segmentation_model(TINY, num_classes=3)


@pytest.fixture(scope="module")
def seg_folder(tmp_path_factory):
    """A small transformers segmenter saved as save_pretrained writes it (64 px crops)."""
    path = tmp_path_factory.mktemp("seg") / "hf"
    hf_segmenter("base-like", seed=7).save_pretrained(path)
    return path


def test_whole_and_slide_inference_follow_transformers_and_mmseg(seg_folder, imagenet_dir):
    """whole: transformers' squash + bilinear logits back to the image; slide: mmseg's grid of
    crops whose logits are averaged where they overlap; flip adds the mirrored logits."""
    from beit_jax.segmentation import crop_boxes, segment, segment_logits

    model, variables = create_segmentation_model(str(seg_folder))
    img = Image.open(sample_photos(imagenet_dir, 1)[0]).convert("RGB")
    whole = segment(model, variables, img, mode="whole")
    assert whole.shape == (img.height, img.width) and whole.dtype == np.int32
    x = (np.asarray(img.resize((64, 64), Image.BILINEAR), np.float32) / 255 - 0.5) / 0.5
    up = jax_resize(np.asarray(model.apply(variables, x[None]))[0], (img.height, img.width))
    assert np.array_equal(whole, up.argmax(-1))

    square = img.resize((64, 64), Image.BILINEAR)  # one crop: slide is whole
    assert np.allclose(segment_logits(model, variables, square, mode="slide"),
                       segment_logits(model, variables, square, mode="whole"), atol=1e-5)
    assert crop_boxes(64, 150, 64, 42) == [(0, 0, 64, 64), (0, 42, 64, 106), (0, 84, 64, 148), (0, 86, 64, 150)]
    wide = img.resize((150, 64), Image.BILINEAR)  # 4 crops; columns 0-41 are only in the first
    logits = segment_logits(model, variables, wide, mode="slide", stride=42)
    first = (np.asarray(wide, np.float32)[:, :64] / 255 - 0.5) / 0.5
    ref = jax_resize(np.asarray(model.apply(variables, first[None]))[0], (64, 64))
    assert np.allclose(logits[:, :42], ref[:, :42], atol=1e-4)

    mirrored = wide.transpose(Image.FLIP_LEFT_RIGHT)
    flipped = segment_logits(model, variables, wide, mode="whole", flip=True)
    assert np.allclose(flipped, segment_logits(model, variables, mirrored, mode="whole", flip=True)[:, ::-1], atol=1e-4)
    with pytest.raises(ValueError, match="mode must be one of whole, slide"):
        segment(model, variables, img, mode="sliding")


def jax_resize(logits, size):
    import jax

    return np.asarray(jax.image.resize(logits, (*size, logits.shape[-1]), "bilinear", antialias=False))


def test_segment_cli_writes_palette_pngs_and_overlays_of_real_photos(seg_folder, imagenet_dir, odd_dir, tmp_path):
    from tests.support import cli

    imgs = sample_photos(imagenet_dir, 3)
    out = tmp_path / "out"
    res = cli("segment", *imgs, odd_dir / "broken.png", "--output", out, "--model", seg_folder, "--flip")
    assert res.returncode == 1 and "cannot read image" in res.stderr and "broken.png" in res.stderr  # the rest is done
    model, variables = create_segmentation_model(str(seg_folder))
    from beit_jax.segmentation import segment

    for p in imgs:
        png = Image.open(out / f"{p.stem}.png")
        photo = Image.open(p)
        assert png.mode == "P" and png.size == photo.size
        assert np.array_equal(np.asarray(png), segment(model, variables, photo, mode="slide", flip=True))
        assert Image.open(out / f"{p.stem}_overlay.jpg").size == photo.size
    summary = json.loads((out / "segment.json").read_text())
    assert [s["image"] for s in summary["images"]] == [str(p) for p in imgs]

    again = cli("segment", imgs[0], "--output", out, "--model", seg_folder)
    assert again.returncode == 2 and "already exists" in again.stderr and "nothing is overwritten" in again.stderr

    # every device: 8 CPU devices in a fresh process (the count is fixed before JAX starts) give the same maps
    from tests.support import run_cli

    eight = run_cli("segment", *imgs, "--output", tmp_path / "eight", "--model", seg_folder, "--flip", "--batch-size", "3",
                    devices=8)
    assert eight.returncode == 0, eight.stderr[-3000:]
    assert "3 images segmented on 8 devices" in eight.stdout
    for p in imgs:
        assert np.array_equal(np.asarray(Image.open(tmp_path / "eight" / f"{p.stem}.png")),
                              np.asarray(Image.open(out / f"{p.stem}.png"))), p.name
