"""Attention implementations: which one runs where (the trace-time decision) and the numbers of
every path that runs on this machine, against a float64 numpy reference."""
from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import beit_jax
from beit_jax import layers
from tests.support import TINY, max_abs, random_images

BEIT = dict(head_dim=64, has_bias=True)  # BEiT-B/L: head dim 64, relative position bias


def decide(requested, platform="cuda", dtype=jnp.bfloat16, seq_len=197, training=False, dropout=False, **kw):
    return layers.resolve_attn_impl(requested, platform=platform, dtype=dtype, seq_len=seq_len, training=training,
                                    dropout=dropout, **dict(BEIT, **kw))


def test_auto_picks_cudnn_only_where_it_runs():
    assert decide("auto") == ("cudnn", None)  # bf16 inference on an NVIDIA GPU, 197 tokens
    assert decide("auto", dtype=jnp.float16, seq_len=577) == ("cudnn", None)
    assert decide("auto", training=True, seq_len=196) == ("cudnn", None)  # even length: cuDNN has the bias grad
    assert decide("auto", training=True, seq_len=197, has_bias=False) == ("cudnn", None)
    for kw, why in [(dict(platform="cpu"), "NVIDIA GPU (this backend is cpu)"),
                    (dict(platform="tpu"), "this backend is tpu"),
                    (dict(platform="rocm"), "this backend is rocm"),
                    (dict(dtype=jnp.float32), "bfloat16/float16 compute (this model computes in float32"),
                    (dict(head_dim=60), "multiple of 8"),
                    (dict(head_dim=256), "at most 128"),
                    (dict(training=True, dropout=True, seq_len=196), "attention dropout"),
                    (dict(training=True, seq_len=197), "odd sequence length (197 tokens)"),
                    (dict(training=True, seq_len=1025), "odd sequence length (1025 tokens)")]:
        impl, reason = decide("auto", **kw)
        assert impl == "xla" and why in reason, kw
        assert decide("cudnn", **kw) == (impl, reason)  # an explicit request falls back the same way


def test_explicit_paths_are_kept_and_bad_names_refused():
    assert decide("xla") == ("xla", None)
    assert decide("dot_product_attention", platform="cpu", dtype=jnp.float32) == ("dot_product_attention", None)
    with pytest.raises(ValueError, match="attn_impl must be one of"):
        decide("flash")
    with pytest.raises(ValueError, match="attn_impl must be one of"):
        beit_jax.build_model(TINY, attn_impl="cuDNN").init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))


def test_model_reports_the_decision_its_layers_make():
    model = beit_jax.build_model("beit_large_patch16_384", dtype=jnp.bfloat16, attn_drop_rate=0.1)
    platform = layers.backend_platform()
    expected = decide("auto", platform=platform, seq_len=577)
    assert model.attention_impl() == expected
    assert model.attention_impl(training=True) == decide("auto", platform=platform, seq_len=577, training=True,
                                                         dropout=True)


def test_cudnn_request_that_cannot_run_warns_once_and_runs_xla(monkeypatch):
    if layers.backend_platform() == "cuda":
        pytest.skip("cuDNN can run here")
    monkeypatch.setattr(layers, "_warned", set())
    x = random_images(2, 64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, variables = beit_jax.create_model(TINY, attn_impl="cudnn")  # init traces 2 layers
        out = jax.jit(model.apply)(variables, x)  # traced again
        out1 = jax.jit(model.apply)(variables, x[:1])  # traced again
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1, msgs
    assert "attn_impl='cudnn' cannot run here" in msgs[0] and "running attn_impl='xla'" in msgs[0]
    ref = jax.jit(model.clone(attn_impl="xla").apply)(variables, x)
    np.testing.assert_array_equal(out, ref)
    assert max_abs(out1, ref[:1]) < 1e-6


def _qkvb(dtype=np.float32, b=2, h=3, n=17, hd=8, seed=0):
    rng = np.random.RandomState(seed)
    q, k, v = (rng.randn(b, h, n, hd).astype(np.float32) for _ in range(3))
    bias = rng.randn(h, n, n).astype(np.float32)
    return [jnp.asarray(a, dtype) for a in (q, k, v)] + [jnp.asarray(bias)]


def _reference(q, k, v, bias):
    q, k, v, bias = (np.asarray(a, np.float64) for a in (q, k, v, bias))
    logits = np.einsum("bhqd,bhkd->bhqk", q, k) + bias[None]
    p = np.exp(logits - logits.max(-1, keepdims=True))
    out = np.einsum("bhqk,bhkd->bhqd", p / p.sum(-1, keepdims=True), v)
    b, h, n, hd = out.shape
    return out.transpose(0, 2, 1, 3).reshape(b, n, h * hd)


@pytest.mark.parametrize("impl", ["xla", "dot_product_attention", "auto"])
def test_attention_paths_match_reference(impl):
    q, k, v, bias = _qkvb()
    out = jax.jit(lambda *a: layers.attend(*a, impl=impl, dtype=jnp.float32))(q, k, v, bias)
    assert out.shape == (2, 17, 24) and max_abs(out, _reference(q, k, v, bias)) < 1e-5
    q16, k16, v16, _ = _qkvb(jnp.bfloat16)
    out16 = jax.jit(lambda *a: layers.attend(*a, impl=impl, dtype=jnp.bfloat16))(q16, k16, v16, bias)
    assert out16.dtype == jnp.bfloat16 and max_abs(out16, _reference(q16, k16, v16, bias)) < 3e-2


def test_fused_forward_with_xla_backward_gives_reference_gradients():
    """The wrapper that gives a cuDNN forward XLA's backward (odd sequence lengths outside
    training): here with jax.nn's XLA kernel as the 'fused' forward, since cuDNN needs a GPU."""
    q, k, v, bias = _qkvb(n=17)
    fused = lambda *a: layers._jax_nn_attention(*a, "xla")  # noqa: E731
    wrapped = lambda *a: layers._with_xla_backward(fused, *a)  # noqa: E731
    reference = lambda *a: layers._xla_attention(*a, jnp.float32)  # noqa: E731
    assert max_abs(jax.jit(wrapped)(q, k, v, bias), _reference(q, k, v, bias)) < 1e-5
    cot = jnp.asarray(np.random.RandomState(1).randn(2, 17, 24).astype(np.float32))

    def grads(fn):
        return jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) * cot), argnums=(0, 1, 2, 3)))(q, k, v, bias)

    for got, ref in zip(grads(wrapped), grads(reference)):
        assert got.shape == ref.shape and max_abs(got, ref) < 1e-5
