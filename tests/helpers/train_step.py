"""Two data-parallel train steps on whatever devices this process has; saves the params (npz)."""
import sys

import jax
import numpy as np
from flax import traverse_util

import beit_jax
from beit_jax import finetune


def main():
    model, variables = beit_jax.create_model("beit_base_patch16_224", num_classes=10, img_size=64, depth=2,
                                             drop_path_rate=0.1, rng=0)
    cfg = finetune.TrainConfig(lr=1e-3, warmup_steps=1, total_steps=10, seed=0)
    tx = finetune.make_optimizer(model, variables, cfg)
    trainer = finetune.ShardedTrainer(model, tx, cfg, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    state = trainer.put_state(finetune.create_train_state(model, variables, tx, seed=0))
    rng = np.random.RandomState(0)
    for _ in range(2):
        images = rng.randint(0, 256, (16, 64, 64, 3)).astype(np.uint8)
        labels = rng.randint(0, 10, (16,)).astype(np.int32)
        weights = np.ones((16,), np.float32)
        weights[-3:] = 0  # padded rows must not count
        state, metrics = trainer.train_step(state, *trainer.put(images, labels, weights))
    flat = traverse_util.flatten_dict(jax.device_get(state.params), sep="/")
    np.savez(sys.argv[1], **{k: np.asarray(v) for k, v in flat.items()})
    print(f"devices={jax.device_count()} loss={float(metrics['loss']):.6f}")


if __name__ == "__main__":
    main()
