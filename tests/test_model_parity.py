"""The Flax BEiT against timm's PyTorch BEiT, float32, on perturbed random weights."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import beit_jax
from beit_jax import weights
from conftest import max_abs, random_images, timm_model, timm_state_dict, to_nchw

TOL = 1e-4  # max abs, float32; measured values are ~1e-6 (logits) to ~5e-6 (tokens)

ARCHS = [
    pytest.param("beit_base_patch16_224"),
    pytest.param("beit_base_patch16_384"),
    pytest.param("beitv2_base_patch16_224"),
    pytest.param("beit_large_patch16_224", marks=pytest.mark.slow),
    pytest.param("beitv2_large_patch16_224", marks=pytest.mark.slow),
    pytest.param("beit_large_patch16_384", marks=pytest.mark.slow),
    pytest.param("beit_large_patch16_512", marks=pytest.mark.slow),
]


def _jit_apply(model, method=None, **kw):
    return jax.jit(lambda v, x: model.apply(v, x, method=method, **kw))


def _timm_and_flax(name, timm_kwargs=None, **flax_kwargs):
    """(perturbed timm model, Flax model, Flax variables converted from the timm weights)."""
    tm = timm_model(name, **(flax_kwargs if timm_kwargs is None else timm_kwargs))
    model = beit_jax.build_model(name, **flax_kwargs)
    return tm, model, beit_jax.convert_timm_state_dict(timm_state_dict(tm), model)


@pytest.mark.parametrize("name", ARCHS)
def test_logits_and_features_match_timm(name):
    tm, model, variables = _timm_and_flax(name)
    x = random_images(2, model.img_size)
    with torch.no_grad():
        ref_feats = tm.forward_features(to_nchw(x))
        ref_logits = tm.forward_head(ref_feats).numpy()
    feats = _jit_apply(model, "forward_features")(variables, x)
    logits = _jit_apply(model)(variables, x)
    assert feats.shape == tuple(ref_feats.shape) == (2, model.num_patches + 1, model.embed_dim)
    assert logits.shape == (2, 1000)
    d_feat, d_logit = max_abs(feats, ref_feats.numpy()), max_abs(logits, ref_logits)
    print(f"{name}: max|dlogits|={d_logit:.2e} max|dfeatures|={d_feat:.2e}")
    assert d_logit < TOL and d_feat < TOL


def test_wrong_mapping_would_be_caught():
    """The perturbation makes q/v biases matter: swapping them must break parity."""
    name = "beit_base_patch16_224"
    tm = timm_model(name)
    sd = timm_state_dict(tm)
    sd["blocks.0.attn.q_bias"], sd["blocks.0.attn.v_bias"] = sd["blocks.0.attn.v_bias"], sd["blocks.0.attn.q_bias"]
    model = beit_jax.build_model(name)
    x = random_images(1, 224)
    out = _jit_apply(model)(beit_jax.convert_timm_state_dict(sd, model), x)
    with torch.no_grad():
        ref = tm(to_nchw(x)).numpy()
    assert max_abs(out, ref) > 100 * TOL


@pytest.mark.parametrize("global_pool", ["avg", "token", ""])
def test_pooling_and_num_classes_zero(global_pool):
    name = "beit_base_patch16_224"
    tm = timm_model(name, num_classes=0, global_pool=global_pool)
    model, _ = beit_jax.create_model(name, num_classes=0, global_pool=global_pool)
    variables = beit_jax.convert_timm_state_dict(timm_state_dict(tm), model)
    x = random_images(2, 224, seed=1)
    with torch.no_grad():
        ref = tm(to_nchw(x)).numpy()
        ref_pre = tm.forward_head(tm.forward_features(to_nchw(x)), pre_logits=True).numpy()
    out = _jit_apply(model)(variables, x)
    tokens = model.apply(variables, x, method="forward_features")
    pre = model.apply(variables, tokens, pre_logits=True, method="forward_head")
    expected_shape = (2, 768) if global_pool else (2, 197, 768)
    assert out.shape == expected_shape
    assert max_abs(out, ref) < TOL and max_abs(pre, ref_pre) < TOL
    # the final norm sits where timm puts it: fc_norm for avg, norm otherwise
    assert ("fc_norm" in variables["params"]) == (global_pool == "avg")
    assert ("norm" in variables["params"]) == (global_pool != "avg")


def test_pre_logits_of_classifier_model():
    name = "beitv2_base_patch16_224"
    tm, model, variables = _timm_and_flax(name)
    x = random_images(1, 224, seed=2)
    with torch.no_grad():
        ref = tm.forward_head(tm.forward_features(to_nchw(x)), pre_logits=True).numpy()
    tokens = model.apply(variables, x, method="forward_features")
    pre = model.apply(variables, tokens, pre_logits=True, method="forward_head")
    assert pre.shape == (1, 768) and max_abs(pre, ref) < TOL


@pytest.mark.parametrize("indices,norm,fmt,prefix", [
    (None, False, "NHWC", False),
    ([0, 5, -1], True, "NLC", True),
    (3, True, "NHWC", False),
])
def test_forward_intermediates(indices, norm, fmt, prefix):
    name = "beit_base_patch16_224"
    tm, model, variables = _timm_and_flax(name, global_pool="token")  # token pooling: `norm` is a real LayerNorm
    x = random_images(2, 224, seed=3)
    timm_fmt = "NCHW" if fmt == "NHWC" else "NLC"
    with torch.no_grad():
        ref_final, ref = tm.forward_intermediates(to_nchw(x), indices=indices, norm=norm,
                                                  output_fmt=timm_fmt, return_prefix_tokens=prefix)
    final, ours = model.apply(variables, x, indices=indices, norm=norm, output_fmt=fmt,
                              return_prefix_tokens=prefix, method="forward_intermediates")
    assert len(ours) == len(ref)
    assert max_abs(final, ref_final.numpy()) < TOL
    for a, b in zip(ours, ref):
        if prefix:
            (a, a_cls), (b, b_cls) = a, b
            assert max_abs(a_cls, b_cls.numpy()) < TOL
        b = b.numpy()
        if fmt == "NHWC":
            b = b.transpose(0, 2, 3, 1)
        assert a.shape == b.shape
        assert max_abs(a, b) < TOL
    only = model.apply(variables, x, indices=2, stop_early=True, intermediates_only=True,
                       method="forward_intermediates")
    assert len(only) == 2 and only[0].shape == (2, 14, 14, 768)


def test_224_weights_at_384_match_timm_filter(tmp_path):
    """create_model(img_size=384) on a 224 checkpoint resizes the tables as timm's filter does."""
    from timm.models.beit import checkpoint_filter_fn
    import timm

    name = "beit_base_patch16_224"
    sd = timm_state_dict(timm_model(name))
    path = tmp_path / "w224.safetensors"
    weights.save_safetensors(sd, path)
    tm384 = timm.create_model(name, img_size=384).eval()
    tm384.load_state_dict(checkpoint_filter_fn({k: torch.from_numpy(v) for k, v in sd.items()}, tm384))
    model, variables = beit_jax.create_model(name, img_size=384, checkpoint_path=str(path))
    assert model.img_size == 384
    assert variables["params"]["blocks_0"]["attn"]["relative_position_bias_table"].shape == (47 * 47 + 3, 12)
    x = random_images(1, 384, seed=4)
    with torch.no_grad():
        ref = tm384(to_nchw(x)).numpy()
    out = _jit_apply(model)(variables, x)
    print(f"224->384: max|dlogits|={max_abs(out, ref):.2e}")
    assert max_abs(out, ref) < TOL


def test_shared_rel_pos_bias_and_abs_pos_embed_options(tmp_path):
    """Options no registered tag uses, still timm-exact: shared bias table, absolute pos embed, resize."""
    from timm.models.beit import checkpoint_filter_fn
    import timm

    opts = dict(depth=2, use_abs_pos_emb=True, use_rel_pos_bias=False, use_shared_rel_pos_bias=True)
    name = "beit_base_patch16_224"
    tm = timm_model(name, **opts)
    sd = timm_state_dict(tm)
    assert "rel_pos_bias.relative_position_bias_table" in sd and "pos_embed" in sd
    model = beit_jax.build_model(name, **opts)
    variables = beit_jax.convert_timm_state_dict(sd, model)
    x = random_images(2, 224, seed=5)
    with torch.no_grad():
        ref = tm(to_nchw(x)).numpy()
    assert max_abs(_jit_apply(model)(variables, x), ref) < TOL

    tm_big = timm.create_model(name, img_size=288, **opts).eval()
    tm_big.load_state_dict(checkpoint_filter_fn({k: torch.from_numpy(v) for k, v in sd.items()}, tm_big))
    big = beit_jax.build_model(name, img_size=288, **opts)
    big_vars = beit_jax.convert_timm_state_dict(sd, big)
    np.testing.assert_allclose(big_vars["params"]["pos_embed"], tm_big.pos_embed.detach().numpy(), atol=1e-5)
    xb = random_images(1, 288, seed=6)
    with torch.no_grad():
        ref_big = tm_big(to_nchw(xb)).numpy()
    assert max_abs(_jit_apply(big)(big_vars, xb), ref_big) < TOL


def test_no_recompilation_for_fixed_shape():
    model, variables = beit_jax.create_model("beit_base_patch16_224", num_classes=10)
    fwd = jax.jit(model.apply)
    for seed in range(3):
        fwd(variables, random_images(2, 224, seed=seed)).block_until_ready()
    assert fwd._cache_size() == 1


def test_wrong_input_size_is_a_clear_error():
    model, variables = beit_jax.create_model("beit_base_patch16_224", num_classes=0)
    with pytest.raises(ValueError, match="img_size=256"):
        model.apply(variables, jnp.zeros((1, 256, 256, 3)))


def test_dropout_and_drop_path_need_rng_and_change_output():
    model, variables = beit_jax.create_model("beit_base_patch16_224", num_classes=0, drop_path_rate=0.5)
    x = random_images(4, 224, seed=7)
    eval_out = model.apply(variables, x)
    train_a = model.apply(variables, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)})
    train_b = model.apply(variables, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(2)})
    assert max_abs(train_a, eval_out) > 1e-3 and max_abs(train_a, train_b) > 1e-3
    # drop_path_rate=0 is the identity even in training mode
    plain, _ = beit_jax.create_model("beit_base_patch16_224", num_classes=0)
    same = plain.apply(variables, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)})
    assert max_abs(same, eval_out) < 1e-6


def test_random_init_follows_timm_scheme():
    """Same init statistics as timm: zero tables/q,v biases, gamma=init_values, scaled head, depth-scaled proj."""
    model, variables = beit_jax.create_model("beit_base_patch16_224")
    p = variables["params"]
    tm = __import__("timm").create_model("beit_base_patch16_224")
    assert np.all(np.asarray(p["blocks_0"]["attn"]["relative_position_bias_table"]) == 0)
    assert np.allclose(p["blocks_3"]["gamma_1"], 0.1)
    for ours, theirs in [(p["head"]["kernel"], tm.head.weight), (p["blocks_11"]["attn"]["proj"]["kernel"],
                                                                 tm.blocks[11].attn.proj.weight)]:
        assert np.std(np.asarray(ours)) == pytest.approx(float(theirs.detach().std()), rel=0.1)


def test_bfloat16_close_to_float32(imagenet_dir):
    """bf16 compute (fp32 params, softmax, LayerNorm): logits within 2% of the logit range; top-1 reported."""
    from beit_jax.transforms import load_image

    name = "beit_base_patch16_224"
    tm = timm_model(name)
    sd = timm_state_dict(tm)
    model32 = beit_jax.build_model(name)
    model16 = beit_jax.build_model(name, dtype=jnp.bfloat16)
    variables = beit_jax.convert_timm_state_dict(sd, model32)
    transform = beit_jax.create_transform(**beit_jax.resolve_data_config(model32))
    paths = sorted(imagenet_dir.iterdir())[:16]
    x = np.stack([transform(load_image(p)) for p in paths])
    l32 = np.asarray(_jit_apply(model32)(variables, x))
    l16 = np.asarray(_jit_apply(model16)(variables, x), dtype=np.float32)
    span = float(l32.max() - l32.min())
    rel = max_abs(l16, l32) / span
    agree = float(np.mean(l16.argmax(-1) == l32.argmax(-1)))
    print(f"bf16 vs fp32: max|dlogits|/range={rel:.3e}, top-1 agreement={agree:.2f}")
    assert rel < 0.02
    assert agree >= 0.75


@pytest.mark.parametrize("attn_impl", ["dot_product_attention"])
def test_fused_attention_path_matches_timm(attn_impl):
    """jax.nn.dot_product_attention (cuDNN on GPU; XLA here) is as timm-exact as the default path."""
    name = "beit_base_patch16_224"
    tm, model, variables = _timm_and_flax(name, timm_kwargs={}, attn_impl=attn_impl)
    x = random_images(2, 224, seed=11)
    with torch.no_grad():
        ref = tm(to_nchw(x)).numpy()
    assert max_abs(_jit_apply(model)(variables, x), ref) < TOL


def test_chunked_forward_equals_whole_batch():
    from beit_jax.model import chunked

    model, variables = beit_jax.create_model("beit_base_patch16_224", num_classes=0)
    x = random_images(8, 224, seed=12)
    whole = jax.jit(model.apply)(variables, x)
    parts = jax.jit(chunked(model.apply, 4))(variables, x)
    odd = jax.jit(chunked(model.apply, 3))(variables, x)  # 8 % 3 != 0: runs whole
    assert parts.shape == whole.shape == (8, 768)
    assert max_abs(parts, whole) < 1e-5 and max_abs(odd, whole) < 1e-5


def test_attention_maps_match_timm():
    """Attention probabilities of a block equal what timm's (non-fused) attention computes."""
    name = "beit_base_patch16_224"
    tm, model, variables = _timm_and_flax(name)
    x = random_images(1, 224, seed=13)
    captured = {}
    blk = tm.blocks[5].attn
    hook = blk.attn_drop.register_forward_hook(lambda mod, inp, out: captured.setdefault("attn", inp[0].detach()))
    blk.fused_attn = False
    try:
        with torch.no_grad():
            tm(to_nchw(x))
    finally:
        blk.fused_attn = True
        hook.remove()
    maps = model.apply(variables, x, block=5, method="attention_maps")
    assert maps.shape == (1, 12, 197, 197)
    assert max_abs(maps, captured["attn"].numpy()) < 1e-5


def test_cast_for_inference_is_exact():
    from beit_jax.model import cast_for_inference

    model, variables = beit_jax.create_model("beit_base_patch16_224", dtype=jnp.bfloat16)
    cast = cast_for_inference(model, variables)
    p = cast["params"]
    assert p["blocks_0"]["attn"]["qkv"]["kernel"].dtype == jnp.bfloat16
    assert p["blocks_0"]["norm1"]["scale"].dtype == jnp.float32
    assert p["blocks_0"]["attn"]["relative_position_bias_table"].dtype == jnp.float32
    x = random_images(2, 224, seed=14)
    fwd = jax.jit(model.apply)
    assert np.array_equal(np.asarray(fwd(variables, x), np.float32), np.asarray(fwd(cast, x), np.float32))


def test_flop_count_matches_timm_published_macs():
    """timm lists 17.6 GMACs (base) and 61.6 GMACs (large) at 224: GFLOP = 2 x MACs."""
    assert beit_jax.build_model("beit_base_patch16_224").gflop_per_image == pytest.approx(2 * 17.6, rel=0.01)
    assert beit_jax.build_model("beit_large_patch16_224").gflop_per_image == pytest.approx(2 * 61.6, rel=0.01)
