"""Two data-parallel train steps on whatever devices this process has, three times: plain, with
random erasing, cutmix then mixup and an EMA (every device-side augmentation over the sharded
global batch), and with mixup_mode='elem' (a lambda, a choice and a box per row of the global
batch). Saves the params (and the EMA) of the runs to one npz, keys "plain/...", "augment/..."
and "elem/...".
"""
import sys

import jax
import numpy as np
from flax import traverse_util

import beit_jax
from beit_jax import finetune


def run(kind: str):
    augmented = kind != "plain"
    model, variables = beit_jax.create_model("test_beit", num_classes=10, drop_path_rate=0.1, rng=0)
    extra = dict(reprob=0.5, mixup=0.8, cutmix=1.0, model_ema_decay=0.9) if augmented else {}
    if kind == "elem":
        extra.update(mixup_mode="elem")
    cfg = finetune.TrainConfig(lr=1e-3, warmup_steps=1, total_steps=10, seed=0, **extra)
    tx = finetune.make_optimizer(model, variables, cfg)
    trainer = finetune.Trainer(model, cfg, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    state = trainer.put_state(finetune.create_train_state(model, variables, tx, seed=0, ema=augmented))
    rng = np.random.RandomState(0)
    mixes = [finetune.mix_arrays(0.7, True, (10, 40, 5, 50)), finetune.mix_arrays(0.6, False, (0, 0, 0, 0))]
    if kind == "elem":
        mixes = [finetune.mix_arrays(*cfg.mixer().draw(np.random.default_rng(i), 16, 64, 64)) for i in range(2)]
        assert all(m["lam"].shape == (16,) and 0 < m["cutmix"].sum() < 16 for m in mixes)
    for i in range(2):
        images = rng.randint(0, 256, (16, 64, 64, 3)).astype(np.uint8)
        labels = rng.randint(0, 10, (16,)).astype(np.int32)
        weights = np.ones((16,), np.float32)
        weights[-3:] = 0  # padded rows must not count
        boxes = np.tile(np.asarray([[3, 4, 20, 30]], np.int32), (16, 1)) if augmented else None
        seeds = np.arange(16, dtype=np.int32) + 100 * i
        state, metrics = trainer.step(state, images, labels, weights, boxes, seeds, mixes[i] if augmented else None)
    out = traverse_util.flatten_dict(jax.device_get(state.params), sep="/")
    if augmented:
        out.update({"ema/" + k: v for k, v in traverse_util.flatten_dict(jax.device_get(state.ema_params), sep="/").items()})
    return out, float(metrics["loss"])


def main():
    arrays, losses = {}, []
    for mode in ("plain", "augment", "elem"):
        flat, loss = run(mode)
        arrays.update({f"{mode}/{k}": np.asarray(v) for k, v in flat.items()})
        losses.append(f"{mode} loss={loss:.6f}")
    for other in ("plain", "augment"):  # per-row mixing acted, and differently from one draw per batch
        assert not np.allclose(arrays["elem/head/kernel"], arrays[f"{other}/head/kernel"]), other
    np.savez(sys.argv[1], **arrays)
    print(f"devices={jax.device_count()} " + " ".join(losses))


if __name__ == "__main__":
    main()
