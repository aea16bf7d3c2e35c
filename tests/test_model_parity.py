"""The Flax BEiT against timm's PyTorch BEiT, float32, on perturbed random weights."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import beit_jax
from tests.support import (TINY, as_tensors, max_abs, random_images, timm_and_flax, timm_attention_probs, timm_model,
                           timm_state_dict, to_nchw)

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


@pytest.mark.parametrize("name", ARCHS)
def test_logits_and_features_match_timm(name):
    tm, model, variables = timm_and_flax(name)
    # __call__ end to end on 2 images for the base sizes; the large ones (the slowest CPU tests) run
    # one image and take the head of the checked features instead of a second full forward: the same
    # mapping at a quarter of the compute (batching is checked at base size)
    large = "large" in name
    b = 1 if large else 2
    x = random_images(b, model.img_size)
    with torch.no_grad():
        ref_feats = tm.forward_features(to_nchw(x))
        ref_logits = tm.forward_head(ref_feats).numpy()
    feats = _jit_apply(model, "forward_features")(variables, x)
    logits = _jit_apply(model, "forward_head")(variables, feats) if large else _jit_apply(model)(variables, x)
    assert feats.shape == tuple(ref_feats.shape) == (b, model.num_patches + 1, model.embed_dim)
    assert logits.shape == (b, 1000)
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
    """Pooling and the final norm against timm (on the tiny BEiT: the same code at any size; the
    full-size parity is test_logits_and_features_match_timm)."""
    tm = timm_model(TINY, num_classes=0, global_pool=global_pool)
    model, _ = beit_jax.create_model(TINY, num_classes=0, global_pool=global_pool)
    variables = beit_jax.convert_timm_state_dict(timm_state_dict(tm), model)
    x = random_images(2, 64, seed=1)
    with torch.no_grad():
        ref = tm(to_nchw(x)).numpy()
        ref_pre = tm.forward_head(tm.forward_features(to_nchw(x)), pre_logits=True).numpy()
    out = _jit_apply(model)(variables, x)
    tokens = _jit_apply(model, "forward_features")(variables, x)
    pre = _jit_apply(model, "forward_head", pre_logits=True)(variables, tokens)
    expected_shape = (2, 64) if global_pool else (2, 17, 64)
    assert out.shape == expected_shape
    assert max_abs(out, ref) < TOL and max_abs(pre, ref_pre) < TOL
    # the final norm sits where timm puts it: fc_norm for avg, norm otherwise
    assert ("fc_norm" in variables["params"]) == (global_pool == "avg")
    assert ("norm" in variables["params"]) == (global_pool != "avg")


def test_pre_logits_of_classifier_model():
    name = "beitv2_base_patch16_224"
    tm, model, variables = timm_and_flax(name)
    x = random_images(1, 224, seed=2)
    with torch.no_grad():
        ref = tm.forward_head(tm.forward_features(to_nchw(x)), pre_logits=True).numpy()
    tokens = _jit_apply(model, "forward_features")(variables, x)
    pre = _jit_apply(model, "forward_head", pre_logits=True)(variables, tokens)
    assert pre.shape == (1, 768) and max_abs(pre, ref) < TOL


@pytest.mark.parametrize("indices,norm,fmt,prefix", [
    (None, False, "NHWC", False),
    ([0, 5, -1], True, "NLC", True),
    (3, True, "NHWC", False),
])
def test_forward_intermediates(indices, norm, fmt, prefix):
    name = "beit_base_patch16_224"
    tm, model, variables = timm_and_flax(name, global_pool="token")  # token pooling: `norm` is a real LayerNorm
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
    beit_jax.save_safetensors(sd, path)
    tm384 = timm.create_model(name, img_size=384).eval()
    tm384.load_state_dict(checkpoint_filter_fn(as_tensors(sd), tm384))
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
    tm_big.load_state_dict(checkpoint_filter_fn(as_tensors(sd), tm_big))
    big = beit_jax.build_model(name, img_size=288, **opts)
    big_vars = beit_jax.convert_timm_state_dict(sd, big)
    np.testing.assert_allclose(big_vars["params"]["pos_embed"], tm_big.pos_embed.detach().numpy(), atol=1e-5)
    xb = random_images(1, 288, seed=6)
    with torch.no_grad():
        ref_big = tm_big(to_nchw(xb)).numpy()
    assert max_abs(_jit_apply(big)(big_vars, xb), ref_big) < TOL


def test_no_recompilation_for_fixed_shape():
    model, variables = beit_jax.create_model(TINY, num_classes=10)
    fwd = jax.jit(model.apply)
    for seed in range(3):
        fwd(variables, random_images(2, 64, seed=seed)).block_until_ready()
    assert fwd._cache_size() == 1


def test_wrong_input_size_is_a_clear_error():
    model, variables = beit_jax.create_model(TINY, num_classes=0)
    with pytest.raises(ValueError, match="input is 96x96 but the model was built for 64x64; create it with img_size=96"):
        model.apply(variables, jnp.zeros((1, 96, 96, 3)))


def test_dropout_and_drop_path_need_rng_and_change_output():
    model, variables = beit_jax.create_model(TINY, num_classes=0, drop_path_rate=0.5)
    x = random_images(4, 64, seed=7)

    def train(m):  # jitted: eagerly, every op of the random masks compiles on its own
        return jax.jit(lambda v, key: m.apply(v, x, deterministic=False, rngs={"dropout": key}))

    eval_out = _jit_apply(model)(variables, x)
    train_model = train(model)
    train_a = train_model(variables, jax.random.PRNGKey(1))
    train_b = train_model(variables, jax.random.PRNGKey(2))
    assert max_abs(train_a, eval_out) > 1e-3 and max_abs(train_a, train_b) > 1e-3
    # drop_path_rate=0 is the identity even in training mode
    plain, _ = beit_jax.create_model(TINY, num_classes=0)
    same = train(plain)(variables, jax.random.PRNGKey(1))
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


def test_jax_nn_attention_path_matches_timm():
    """attn_impl='dot_product_attention' (jax.nn.dot_product_attention, XLA kernel: the code the
    'cudnn' path runs, with the kernel CPU has) is as timm-exact as the default path."""
    name = "beit_base_patch16_224"
    tm, model, variables = timm_and_flax(name, timm_kwargs={}, attn_impl="dot_product_attention")
    x = random_images(2, 224, seed=11)
    with torch.no_grad():
        ref = tm(to_nchw(x)).numpy()
    assert max_abs(_jit_apply(model)(variables, x), ref) < TOL


def test_plain_jit_apply_micro_batches_on_cpu_and_matches_timm():
    """README's `jax.jit(model.apply)` takes the micro-batched path by itself on one CPU device
    (a scan over chunks of 8 in the program), and stays timm-exact."""
    tm, model, variables = timm_and_flax(TINY)
    x = random_images(16, model.img_size, seed=12)
    assert model.micro_batch == "auto" and model.micro_batch_rows(16) == 8
    assert "scan" in str(jax.make_jaxpr(model.apply)(variables, x))
    assert "scan" not in str(jax.make_jaxpr(model.clone(micro_batch=None).apply)(variables, x))
    with torch.no_grad():
        ref = tm(to_nchw(x)).numpy()
    assert max_abs(jax.jit(model.apply)(variables, x), ref) < TOL


def test_micro_batches_equal_whole_batch_forward_and_gradients():
    model, variables = beit_jax.create_model(TINY)
    whole = model.clone(micro_batch=None)
    x = random_images(24, model.img_size, seed=13)  # auto: 3 chunks of 8
    for method, kw in [(None, {}), ("attention_maps", {}),
                       ("forward_intermediates", dict(indices=[0, 1], return_prefix_tokens=True))]:
        got = jax.jit(lambda v, x: model.apply(v, x, method=method, **kw))(variables, x)
        ref = jax.jit(lambda v, x: whole.apply(v, x, method=method, **kw))(variables, x)
        assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(ref)
        for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref)):
            assert a.shape == b.shape and a.shape[0] == 24 and max_abs(a, b) < 1e-5, method
    assert [model.clone(micro_batch=mb).micro_batch_rows(n) for mb, n in [(5, 24), (6, 24), (8, 8), ("auto", 20),
                                                                           ("auto", 9), ("auto", 1)]] \
        == [None, 6, None, 5, None, None]  # a chunk size must divide a larger batch; auto: 4 to 8 rows
    assert model.micro_batch_rows(24, deterministic=False) is None  # auto leaves training batches whole

    def grads(m):
        return jax.jit(jax.grad(lambda v: jnp.mean(m.apply(v, x) ** 2)))(variables)

    g_chunked, g_whole = grads(model), grads(whole)
    for path, a in jax.tree_util.tree_flatten_with_path(g_chunked)[0]:
        b = dict(jax.tree_util.tree_flatten_with_path(g_whole)[0])[path]
        scale = float(np.abs(np.asarray(b)).max()) or 1.0
        assert max_abs(a, b) <= 1e-5 * scale, path


def test_attention_maps_match_timm():
    """Attention probabilities of a block equal what timm's (non-fused) attention computes."""
    name = "beit_base_patch16_224"
    tm, model, variables = timm_and_flax(name)
    x = random_images(1, 224, seed=13)
    maps = model.apply(variables, x, block=5, method="attention_maps")
    assert maps.shape == (1, 12, 197, 197)
    assert max_abs(maps, timm_attention_probs(tm, 5, x)) < 1e-5


def test_cast_for_inference_is_exact():
    from beit_jax import cast_for_inference

    model, variables = beit_jax.create_model(TINY, dtype=jnp.bfloat16)
    cast = cast_for_inference(model, variables)
    p = cast["params"]
    assert p["blocks_0"]["attn"]["qkv"]["kernel"].dtype == jnp.bfloat16
    assert p["blocks_0"]["norm1"]["scale"].dtype == jnp.float32
    assert p["blocks_0"]["attn"]["relative_position_bias_table"].dtype == jnp.float32
    x = random_images(2, 64, seed=14)
    fwd = jax.jit(model.apply)
    assert np.array_equal(np.asarray(fwd(variables, x), np.float32), np.asarray(fwd(cast, x), np.float32))


def test_flop_count_matches_timm_published_macs():
    """timm lists 17.6 GMACs (base) and 61.6 GMACs (large) at 224: GFLOP = 2 x MACs."""
    assert beit_jax.build_model("beit_base_patch16_224").gflop_per_image == pytest.approx(2 * 17.6, rel=0.01)
    assert beit_jax.build_model("beit_large_patch16_224").gflop_per_image == pytest.approx(2 * 61.6, rel=0.01)


def test_library_initialiser_and_drop_path_equal_the_hand_written_ones():
    """layers.trunc_normal (jax.nn.initializers) and drop_path (nn.Dropout with broadcast dims)
    replaced hand-written versions: same numbers for the same key, and timm's per-sample rule."""
    import flax.linen as nn

    from beit_jax.layers import drop_path, trunc_normal

    key = jax.random.PRNGKey(3)
    std, scale = 0.02, 0.001
    hand = jax.random.truncated_normal(key, -2.0 / std, 2.0 / std, (768, 1000)) * (std * scale)
    np.testing.assert_array_equal(trunc_normal(std, scale)(key, (768, 1000)), hand)

    class HandDropPath(nn.Module):  # the replaced module, for reference
        rate: float

        @nn.compact
        def __call__(self, x):
            keep = 1.0 - self.rate
            mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
            return jnp.where(mask, x / keep, jnp.zeros_like(x))

    x = jnp.asarray(random_images(64, 4)[..., 0].reshape(64, 4, 4) + 3.0)
    rngs = {"dropout": jax.random.PRNGKey(0)}
    ours = drop_path(0.4).apply({}, x, deterministic=False, rngs=rngs)
    np.testing.assert_array_equal(ours, HandDropPath(0.4).apply({}, x, rngs=rngs))  # same rng, same mask
    per_sample = np.asarray(ours).reshape(64, -1)
    kept = np.all(per_sample != 0, axis=1)
    assert np.all(kept | np.all(per_sample == 0, axis=1))  # whole samples dropped, never parts
    np.testing.assert_allclose(per_sample[kept], (np.asarray(x).reshape(64, -1) / 0.6)[kept], rtol=1e-6)
    assert 0.25 < 1 - kept.mean() < 0.55
