"""`beit_jax.create_nnx_model`: BEiT and BEiT-3 as nnx.Modules. Same numbers as linen (and timm),
nnx.Param parameters, NNX training with the BEiT optimizer, train()/eval() and drop path."""
from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
import torch
from flax import nnx, traverse_util

import beit_jax
from beit_jax import checkpoints, finetune
from tests.support import TINY, max_abs, random_images, timm_model, timm_state_dict, to_nchw

TINY3 = "test_beit3"


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


@pytest.mark.parametrize("name", [TINY, TINY3])
def test_methods_equal_linen_and_timm_on_the_same_weights(name, tmp_path):
    tm = timm_model(name)
    path = tmp_path / "weights.safetensors"
    checkpoints.save_safetensors(timm_state_dict(tm), path)
    model = beit_jax.create_nnx_model(name, checkpoint_path=str(path))
    linen, variables = beit_jax.create_model(name, checkpoint_path=str(path))
    assert isinstance(model, nnx.Module)
    x = random_images(2, 64, seed=1)

    logits = model(x)  # direct calls, no method= strings
    tokens = model.forward_features(x)
    pooled = model.forward_head(tokens, pre_logits=True)
    final, inter = model.forward_intermediates(x, indices=[0, -1], output_fmt="NLC")
    maps = model.attention_maps(x, block=0)
    assert max_abs(logits, linen.apply(variables, x)) <= 1e-6
    assert max_abs(tokens, linen.apply(variables, x, method="forward_features")) <= 1e-6
    assert max_abs(pooled, linen.apply(variables, tokens, pre_logits=True, method="forward_head")) <= 1e-6
    ref_final, ref_inter = linen.apply(variables, x, indices=[0, -1], output_fmt="NLC", method="forward_intermediates")
    assert max_abs(final, ref_final) <= 1e-6 and len(inter) == 2
    assert all(max_abs(a, b) <= 1e-6 for a, b in zip(inter, ref_inter))
    assert max_abs(maps, linen.apply(variables, x, block=0, method="attention_maps")) <= 1e-6
    assert max_abs(nnx.jit(lambda m, x: m(x))(model, x), logits) <= 1e-6
    with torch.no_grad():
        assert max_abs(logits, tm(to_nchw(x)).numpy()) < 1e-4  # and that is timm's number
    assert beit_jax.resolve_data_config(model) == beit_jax.resolve_data_config(linen)


def test_parameters_are_nnx_params_at_the_linen_paths():
    model = beit_jax.create_nnx_model(TINY3, num_classes=10)
    _, variables = beit_jax.create_model(TINY3, num_classes=10)
    params = nnx.state(model, nnx.Param)
    leaves = jax.tree_util.tree_leaves(params, is_leaf=_is_variable)
    assert leaves and all(type(p) is nnx.Param for p in leaves)
    linen_leaves = jax.tree_util.tree_leaves(variables["params"])
    assert len(leaves) == len(linen_leaves)
    timm_count = sum(p.numel() for p in timm_model(TINY3, num_classes=10).parameters())
    assert sum(p.size for p in leaves) == sum(p.size for p in linen_leaves) == timm_count
    ours = traverse_util.flatten_dict(nnx.to_pure_dict(params))
    assert ours.keys() == traverse_util.flatten_dict(variables["params"]).keys()
    assert model.blocks_1["attn"]["qkv"]["kernel"].shape == (64, 192)
    # every other piece of state is the dropout stream, nothing trainable hides elsewhere
    others = jax.tree_util.tree_leaves(nnx.state(model, nnx.Not(nnx.Param)), is_leaf=_is_variable)
    assert {type(v).__name__ for v in others} == {"RngKey", "RngCount"}


def _ce(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def test_nnx_optimizer_training_equals_the_linen_step(tmp_path):
    """nnx.Optimizer(model, tx, wrt=nnx.Param) + nnx.jit + nnx.value_and_grad with the BEiT optimizer
    (layer decay, no-decay mask) built from the NNX state: the same parameters as the same steps on
    the linen model; the result exports like a linen model."""
    cfg = finetune.TrainConfig(lr=1e-3, warmup_steps=0, total_steps=20, weight_decay=0.05, layer_decay=0.75)
    model = beit_jax.create_nnx_model(TINY3, num_classes=4, rng=0)
    linen, variables = beit_jax.create_model(TINY3, num_classes=4, rng=0)

    optimizer = nnx.Optimizer(model, finetune.make_optimizer(model, nnx.state(model, nnx.Param), cfg), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(lambda m: _ce(m(x), y))(model)
        optimizer.update(model, grads)
        return loss

    tx = finetune.make_optimizer(linen, variables, cfg)
    params, opt_state = variables["params"], tx.init(variables["params"])

    @jax.jit
    def linen_step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(lambda p: _ce(linen.apply({"params": p}, x), y))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.RandomState(0)
    x, y = random_images(8, 64, seed=2), rng.randint(0, 4, (8,))
    model.train()
    losses = []
    for _ in range(4):
        losses.append(float(train_step(model, optimizer, x, y)))
        params, opt_state, linen_loss = linen_step(params, opt_state, x, y)
        assert abs(losses[-1] - float(linen_loss)) <= 1e-6
    assert losses[-1] < losses[0] and int(optimizer.step[...]) == 4
    trained = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    for path, value in traverse_util.flatten_dict(params).items():
        assert max_abs(trained[path], value) <= 1e-6, path
    module, trained_vars = model.to_linen()
    mp, _ = beit_jax.save_flax_checkpoint(trained_vars, module, tmp_path / "nnx")
    model.eval()
    reloaded = beit_jax.create_nnx_model(TINY3, checkpoint_path=mp)
    assert max_abs(reloaded(x), model(x)) == 0.0


def test_layer_decay_and_weight_decay_of_the_nnx_state_equal_linen():
    model = beit_jax.create_nnx_model(TINY, num_classes=3)
    linen, variables = model.to_linen()
    state = nnx.state(model, nnx.Param)
    for nnx_tree, linen_tree in [
        (finetune.layer_lr_multipliers(model, state, 0.65), finetune.layer_lr_multipliers(linen, variables, 0.65)),
        (finetune.weight_decay_mask(model, state), finetune.weight_decay_mask(linen, variables)),
    ]:
        assert isinstance(nnx_tree, nnx.State)  # the optimizer's own tree structure
        assert traverse_util.flatten_dict(nnx.to_pure_dict(nnx_tree)) == traverse_util.flatten_dict(linen_tree)
    scales = set(jax.tree_util.tree_leaves(finetune.layer_lr_multipliers(model, state, 0.65)))
    assert scales == {0.65 ** k for k in range(4)}  # stem, 2 blocks, head


def test_train_and_eval_switch_drop_path():
    model = beit_jax.create_nnx_model(TINY3, num_classes=0, drop_path_rate=0.9)
    x = random_images(8, 64, seed=3)
    assert model.deterministic  # built for inference
    eval_out = model(x)
    linen, variables = model.to_linen()
    assert max_abs(eval_out, linen.apply(variables, x)) == 0.0

    model.train()
    a, b = model(x), model(x)
    assert max_abs(a, eval_out) > 1e-3 and max_abs(a, b) > 1e-3  # a new drop-path key per call
    model.eval()
    assert max_abs(model(x), eval_out) == 0.0

    training_view = nnx.view(model, deterministic=False)
    assert max_abs(training_view(x), eval_out) > 1e-3 and model.deterministic
