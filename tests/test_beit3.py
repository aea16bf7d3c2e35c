"""BEiT-3 (timm's `beit3_*` VisionTransformer) against timm, float32, on perturbed random weights:
numerics, the loading paths (timm layout, the original `beit3.*` layout, another img_size), the
round trip to timm, and the user's commands (extract, finetune, convert) on the tiny `test_beit3`."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import beit_jax
from beit_jax import checkpoints, finetune
from beit_jax.mapping import flax_path_to_timm_key
from beit_jax.models.beit3 import convert_beit3_original
from flax import traverse_util
from tests.support import (as_tensors, assert_round_trip_is_identity, cli, max_abs, random_images, timm_and_flax,
                           timm_attention_probs, timm_model, timm_state_dict, to_nchw)

TOL = 1e-4  # max abs, float32 (measured: ~2e-6 logits; unnormalised avg-pool tokens ~3e-6 relative)
BASE = "beit3_base_patch16_224"
TINY3 = "test_beit3"  # 64x64, 2 blocks, width 64


def _jit_apply(model, method=None, **kw):
    return jax.jit(lambda v, x: model.apply(v, x, method=method, **kw))


@pytest.mark.parametrize("name,overrides", [
    pytest.param(BASE, {}),
    pytest.param("beit3_large_patch16_224", {}, marks=pytest.mark.slow),
    pytest.param("beit3_giant_patch14_224", dict(depth=2)),  # timm allows depth=: giant width, 2 blocks
    pytest.param("beit3_giant_patch14_336", dict(depth=2), marks=pytest.mark.slow),
])
def test_logits_and_features_match_timm(name, overrides):
    tm, model, variables = timm_and_flax(name, **overrides)
    large = "large" in name  # the slowest CPU tests: one image, and the head of the checked features
    b = 1 if large else 2
    x = random_images(b, model.img_size)
    with torch.no_grad():
        ref_feats = tm.forward_features(to_nchw(x))
        ref_pre = tm.forward_head(ref_feats, pre_logits=True).numpy()
        ref_logits = tm.forward_head(ref_feats).numpy()

    @jax.jit  # one compile for the three methods
    def forward(v, x):
        feats = model.apply(v, x, method="forward_features")
        logits = model.apply(v, feats, method="forward_head") if large else model.apply(v, x)
        return feats, model.apply(v, feats, pre_logits=True, method="forward_head"), logits

    feats, pre, logits = forward(variables, x)
    assert feats.shape == tuple(ref_feats.shape) == (b, model.num_patches + 1, model.embed_dim)
    assert logits.shape == (b, 1000) and pre.shape == (b, model.embed_dim)
    d_feat, d_pre, d_logit = max_abs(feats, ref_feats.numpy()), max_abs(pre, ref_pre), max_abs(logits, ref_logits)
    scale = float(np.abs(ref_feats.numpy()).max())
    print(f"{name}: max|dlogits|={d_logit:.2e} max|dpooled|={d_pre:.2e} max|dfeatures|={d_feat:.2e} "
          f"(features up to {scale:.1f})")
    assert d_logit < TOL and d_pre < TOL
    # With avg pooling the tokens are the raw residual stream (timm's `norm` is identity there) and,
    # without BEiT's layer scale, it grows with depth (~50 for large): compare them relative to it.
    assert d_feat < TOL * max(1.0, scale)


def test_forward_intermediates_match_timm():
    # token pooling: the final `norm` is a real LayerNorm (identity under avg); 4 blocks of base width
    tm, model, variables = timm_and_flax(BASE, global_pool="token", depth=4)
    x = random_images(2, 224, seed=3)
    with torch.no_grad():
        ref_final, ref = tm.forward_intermediates(to_nchw(x), indices=[0, 2, -1], norm=True, output_fmt="NCHW",
                                                  return_prefix_tokens=True)
        ref_last = tm.forward_intermediates(to_nchw(x), indices=2, output_fmt="NLC", intermediates_only=True)
    final, ours = model.apply(variables, x, indices=[0, 2, -1], norm=True, output_fmt="NHWC",
                              return_prefix_tokens=True, method="forward_intermediates")
    assert len(ours) == len(ref) == 3
    assert max_abs(final, ref_final.numpy()) < TOL
    for (a, a_cls), (b, b_cls) in zip(ours, ref):
        assert max_abs(a_cls, b_cls.numpy()) < TOL
        b = b.numpy().transpose(0, 2, 3, 1)
        assert a.shape == b.shape == (2, 14, 14, 768) and max_abs(a, b) < TOL
    last = model.apply(variables, x, indices=2, output_fmt="NLC", intermediates_only=True, stop_early=True,
                       method="forward_intermediates")
    assert [a.shape for a in last] == [(2, 196, 768)] * 2
    assert max(max_abs(a, b.numpy()) for a, b in zip(last, ref_last)) < TOL


def test_attention_maps_match_timm():
    tm, model, variables = timm_and_flax(BASE)
    x = random_images(1, 224, seed=13)
    maps = model.apply(variables, x, block=5, method="attention_maps")
    assert maps.shape == (1, 12, 197, 197)
    assert max_abs(maps, timm_attention_probs(tm, 5, x)) < 1e-5


@pytest.mark.parametrize("img_size", [384, 160])
def test_224_weights_at_another_size_match_timm_filter(img_size, tmp_path):
    """create_model(img_size=...) on a 224 checkpoint resamples pos_embed as timm's filter does
    (antialiased bicubic, up and down)."""
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    sd = timm_state_dict(timm_model(BASE, depth=2))  # the resample does not depend on depth
    path = tmp_path / "w224.safetensors"
    beit_jax.save_safetensors(sd, path)
    tm = timm.create_model(BASE, img_size=img_size, depth=2).eval()
    tm.load_state_dict(checkpoint_filter_fn(as_tensors(sd), tm), strict=True)
    model, variables = beit_jax.create_model(BASE, img_size=img_size, depth=2, checkpoint_path=str(path))
    grid = img_size // 16
    assert variables["params"]["pos_embed"].shape == (1, grid * grid + 1, 768)
    np.testing.assert_allclose(variables["params"]["pos_embed"], tm.pos_embed.detach().numpy(), atol=1e-6)
    x = random_images(1, img_size, seed=4)
    with torch.no_grad():
        ref = tm(to_nchw(x)).numpy()
    out = _jit_apply(model)(variables, x)
    print(f"224->{img_size}: max|dlogits|={max_abs(out, ref):.2e}")
    assert max_abs(out, ref) < TOL


def test_round_trip_is_identity_and_timm_loads_it_strictly():
    assert_round_trip_is_identity(BASE)


def _to_beit3_original(sd: dict, seed: int = 0) -> dict:
    """The inverse of timm's `_convert_beit3`: a timm state dict as the original torchscale BEiT-3
    checkpoint stores it (`beit3.*` keys, multiway `.A.` (vision) / `.B.` (text) branches, split
    q/k/v, a fairseq position table with two leading padding rows, a text embedding, a mask token)."""
    rng = np.random.RandomState(seed)
    dim = sd["cls_token"].shape[-1]
    block_names = {"norm1": "self_attn_layer_norm", "attn.norm": "self_attn.inner_attn_ln",
                   "attn.proj": "self_attn.out_proj", "norm2": "final_layer_norm", "mlp.fc1": "ffn.{}.fc1",
                   "mlp.norm": "ffn.{}.ffn_layernorm", "mlp.fc2": "ffn.{}.fc2"}
    out = {"beit3.text_embed.weight": rng.randn(50, dim).astype(np.float32),
           "beit3.vision_embed.mask_token": rng.randn(1, 1, dim).astype(np.float32)}
    for key, value in sd.items():
        if key == "cls_token":
            out["beit3.vision_embed.cls_token"] = value
        elif key.startswith("patch_embed."):
            out["beit3.vision_embed." + key[len("patch_embed."):]] = value
        elif key == "pos_embed":
            pos = np.concatenate([rng.randn(2, dim).astype(np.float32), value[0]])
            out["beit3.encoder.embed_positions.A.weight"] = pos
            out["beit3.encoder.embed_positions.B.weight"] = rng.randn(*pos.shape).astype(np.float32)
        elif key.startswith("blocks."):
            _, i, rest = key.split(".", 2)
            module, kind = rest.rsplit(".", 1)
            if module == "attn.qkv":
                names = [(f"self_attn.{c}_proj.{{}}", part) for c, part in zip("qkv", np.split(value, 3, axis=0))]
            else:
                name = block_names[module]
                names = [(name if "{}" in name else name + ".{}", value)]
            for name, part in names:
                for branch in "AB":  # the text branch (B) carries other weights; timm keeps A only
                    v = part if branch == "A" else rng.randn(*part.shape).astype(np.float32)
                    out[f"beit3.encoder.layers.{i}.{name.format(branch)}.{kind}"] = v
        else:  # fc_norm, head: the classification model's own modules, outside beit3.*
            out[key] = value
    return out


def test_original_beit3_layout_loads_as_timm_filter_does(tmp_path):
    from timm.models.vision_transformer import _convert_beit3, checkpoint_filter_fn

    tm = timm_model(TINY3)
    original = _to_beit3_original(timm_state_dict(tm))
    as_torch = as_tensors(original)
    theirs = _convert_beit3(dict(as_torch), None)
    ours = convert_beit3_original(original)
    assert list(ours) == list(theirs)
    for k in theirs:
        np.testing.assert_array_equal(ours[k], theirs[k].numpy(), err_msg=k)

    # loaded as a user would: a release .pth with {"model": ...} nesting, through create_model
    torch.save({"model": as_torch, "args": {}}, tmp_path / "beit3_release.pth")
    model, variables = beit_jax.create_model(TINY3, checkpoint_path=str(tmp_path / "beit3_release.pth"))
    import timm  # the reference: timm's own filter on the same file content, strict load
    ref_tm = timm.create_model("beit3_base_patch16_224", img_size=64, embed_dim=64, depth=2, num_heads=2).eval()
    ref_tm.load_state_dict(checkpoint_filter_fn({"model": dict(as_torch)}, ref_tm), strict=True)
    x = random_images(2, 64, seed=5)
    with torch.no_grad():
        ref = ref_tm(to_nchw(x)).numpy()
        assert max_abs(tm(to_nchw(x)).numpy(), ref) == 0.0  # the layout round trip lost nothing
    assert max_abs(_jit_apply(model)(variables, x), ref) < TOL


def test_mismatches_name_the_beit3_checkpoint():
    sd = timm_state_dict(timm_model(TINY3))
    with pytest.raises(beit_jax.CheckpointMismatchError) as err:
        beit_jax.convert_timm_state_dict(sd, beit_jax.build_model("test_beit"))
    msg = str(err.value)
    assert "blocks.0.attn.norm.weight" in msg and "missing keys" in msg
    assert "a BEiT-3 checkpoint with embed_dim=64, depth=2" in msg and "it fits test_beit3" in msg

    original = _to_beit3_original(sd)
    del original["beit3.encoder.layers.1.self_attn.k_proj.A.bias"]  # incomplete q/k/v: timm drops q, v
    with pytest.raises(beit_jax.CheckpointMismatchError) as err:
        beit_jax.convert_timm_state_dict(original, beit_jax.build_model(TINY3))
    msg = str(err.value)
    assert "missing keys (1):\n    blocks.1.attn.qkv.bias" in msg
    assert "blocks.1.attn.q_proj.bias" in msg and "blocks.1.attn.v_proj.bias" in msg  # named, not dropped
    assert "original BEiT-3 (beit3.* keys) checkpoint" in msg

    big = timm_state_dict(timm_model("beit3_giant_patch14_224", depth=1))
    with pytest.raises(beit_jax.CheckpointMismatchError, match=r"a 16x16 grid of 14px patches"):
        beit_jax.convert_timm_state_dict(big, beit_jax.build_model(BASE))


def test_layer_decay_and_weight_decay_equal_timm():
    from timm.optim._param_groups import param_groups_layer_decay

    tm = timm_model(TINY3, num_classes=10)
    groups = param_groups_layer_decay(tm, weight_decay=0.05, no_weight_decay_list=tm.no_weight_decay(),
                                      layer_decay=0.7)
    by_param = {id(p): g for g in groups for p in g["params"]}
    assert len({g["lr_scale"] for g in groups}) == 4  # stem, 2 blocks (+ final norm), head
    model, variables = beit_jax.create_model(TINY3, num_classes=10)
    scales = traverse_util.flatten_dict(finetune.layer_lr_multipliers(model, variables, 0.7))
    decays = traverse_util.flatten_dict(finetune.weight_decay_mask(model, variables))
    ours = {flax_path_to_timm_key(p): (scales[p], decays[p]) for p in scales}
    assert set(ours) == {n for n, _ in tm.named_parameters()}
    for n, p in tm.named_parameters():
        assert ours[n][0] == pytest.approx(by_param[id(p)]["lr_scale"], rel=1e-12), n
        assert ours[n][1] == (by_param[id(p)]["weight_decay"] > 0), n


def test_random_init_follows_timm_scheme():
    import timm

    model, variables = beit_jax.create_model(TINY3)
    p = variables["params"]
    tm = timm.create_model(BASE, img_size=64, embed_dim=64, depth=2, num_heads=2)  # timm's init, not perturbed
    assert float(np.std(p["cls_token"])) < 1e-5  # timm: normal(std=1e-6)
    for ours, theirs in [(p["head"]["kernel"], tm.head.weight), (p["pos_embed"], tm.pos_embed),
                         (p["blocks_0"]["attn"]["proj"]["kernel"], tm.blocks[0].attn.proj.weight)]:
        assert np.std(np.asarray(ours)) == pytest.approx(float(theirs.detach().std()), rel=0.1)
    assert np.all(np.asarray(p["blocks_0"]["attn"]["qkv"]["bias"]) == 0)


def test_bfloat16_close_to_float32(imagenet_dir):
    from beit_jax import cast_for_inference
    from beit_jax.transforms import load_image

    sd = timm_state_dict(timm_model(BASE, depth=6))  # half depth: bf16 error grows with depth, compile time too
    model32, model16 = beit_jax.build_model(BASE, depth=6), beit_jax.build_model(BASE, depth=6, dtype=jnp.bfloat16)
    variables = beit_jax.convert_timm_state_dict(sd, model32)
    transform = beit_jax.create_transform(**beit_jax.resolve_data_config(model32))
    x = np.stack([transform(load_image(p)) for p in sorted(imagenet_dir.iterdir())[:8]])
    l32 = np.asarray(_jit_apply(model32)(variables, x))
    l16 = np.asarray(_jit_apply(model16)(cast_for_inference(model16, variables), x), dtype=np.float32)
    rel = max_abs(l16, l32) / float(l32.max() - l32.min())
    agree = float(np.mean(l16.argmax(-1) == l32.argmax(-1)))
    print(f"BEiT-3 bf16 vs fp32: max|dlogits|/range={rel:.3e}, top-1 agreement={agree:.2f}")
    assert rel < 0.02 and agree >= 0.75


def test_untrained_giant_has_no_weights_to_download():
    assert beit_jax.get_pretrained_cfg("beit3_giant_patch14_336").input_size == (3, 336, 336)
    with pytest.raises(beit_jax.PretrainedUnavailableError, match="no published weights"):
        beit_jax.create_model("beit3_giant_patch14_224", pretrained=True)


# ---- the user's commands, on the tiny BEiT-3 -------------------------------------------------
def test_extract_command_equals_timm(imagenet_dir, tmp_path):
    """`beit-jax extract --model test_beit3 --checkpoint W` gives timm's logits and pooled features
    for the same images under timm's own eval transform."""
    import timm

    tm = timm_model(TINY3)
    weights = tmp_path / "tiny3.safetensors"
    checkpoints.save_safetensors(timm_state_dict(tm), weights)
    paths = sorted(imagenet_dir.iterdir())[:6]
    res = cli("extract", *paths, "--output", tmp_path / "out", "--model", TINY3, "--checkpoint", weights,
              "--outputs", "pooled,logits", "--batch-size", "4", "--no-progress")
    assert res.returncode == 0, res.stderr
    got_paths, logits = beit_jax.read_features(tmp_path / "out", "logits")
    _, pooled = beit_jax.read_features(tmp_path / "out", "pooled")
    assert got_paths == [str(p) for p in paths]

    cfg = beit_jax.resolve_data_config(TINY3)
    tf = timm.data.create_transform(input_size=cfg["input_size"], interpolation=cfg["interpolation"],
                                    mean=cfg["mean"], std=cfg["std"], crop_pct=cfg["crop_pct"])
    x = torch.stack([tf(beit_jax.load_image(p)) for p in paths])
    with torch.no_grad():
        ref_pooled = tm.forward_head(tm.forward_features(x), pre_logits=True).numpy()
        ref_logits = tm.forward_head(tm.forward_features(x)).numpy()
    assert max_abs(logits, ref_logits) < TOL and max_abs(pooled, ref_pooled) < TOL


def test_finetune_command_then_timm_loads_the_export(imagenet_dir, tmp_path):
    """A few fine-tuning steps of a BEiT-3 from a timm checkpoint, exported, and converted back to
    a timm state dict that timm loads strictly and computes the same logits from."""
    import timm

    train = tmp_path / "train"
    for i, p in enumerate(sorted(imagenet_dir.iterdir())[:8]):
        (train / f"class_{i % 2}").mkdir(parents=True, exist_ok=True)
        (train / f"class_{i % 2}" / p.name).write_bytes(p.read_bytes())
    weights = tmp_path / "tiny3.safetensors"
    checkpoints.save_safetensors(timm_state_dict(timm_model(TINY3)), weights)
    res = cli("finetune", "--train", train, "--output", tmp_path / "run", "--model", TINY3,
              "--checkpoint", weights, "--batch-size", "4", "--steps", "3", "--warmup-steps", "1",
              "--lr", "1e-3", "--no-progress", "--workers", "1")
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.strip().splitlines()[-1])["step"] == 3
    _, start = beit_jax.create_model(TINY3, num_classes=2, checkpoint_path=str(weights))
    model, tuned = beit_jax.create_model(TINY3, checkpoint_path=str(tmp_path / "run" / "model.msgpack"))
    assert model.num_classes == 2
    moved = max_abs(tuned["params"]["blocks_1"]["attn"]["norm"]["scale"], start["params"]["blocks_1"]["attn"]["norm"]["scale"])
    assert moved > 0  # the inner norms are trained too

    back = timm.create_model("beit3_base_patch16_224", img_size=64, embed_dim=64, depth=2, num_heads=2,
                             num_classes=2).eval()
    back.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in beit_jax.to_timm_state_dict(tuned, model).items()},
                         strict=True)
    x = random_images(2, 64, seed=7)
    with torch.no_grad():
        assert max_abs(model.apply(tuned, x), back(to_nchw(x)).numpy()) < TOL


def test_convert_command_verifies_an_original_checkpoint(tmp_path):
    """`beit-jax convert` on an original beit3.* release: converted, checked against timm's own
    filter (--verify), and loadable from the .msgpack."""
    tm = timm_model(TINY3)
    torch.save({"model": as_tensors(_to_beit3_original(timm_state_dict(tm)))},
               tmp_path / "release.pth")
    res = cli("convert", tmp_path / "release.pth", "--model", TINY3, "-o", tmp_path / "out", "--verify")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "OK: max abs difference" in res.stdout
    model, variables = beit_jax.create_model(TINY3, checkpoint_path=str(tmp_path / "out.msgpack"))
    x = random_images(1, 64, seed=6)
    with torch.no_grad():
        assert max_abs(model.apply(variables, x), tm(to_nchw(x)).numpy()) < TOL
