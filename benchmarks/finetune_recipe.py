"""`--recipe beit` vs the plain recipe on the digits ImageFolder (the 2-block, base-width, 64px
BEiT of tests/test_finetune.py, random init): val top-1/top-5 after training.

    .venv/bin/python benchmarks/finetune_recipe.py [--variants plain recipe ...] [--steps 200]

Variants:
  plain          the settings of test_small_config_learns_digits (lr 2e-3, layer decay 0.85, crops
                 (0.6, 1), no flip, no RandAugment/erasing/mixup, no drop path), --steps steps
  recipe         --recipe beit at batch 32 (lr 4e-3 * 32 / 1024, layer decay 0.65, drop path 0.1,
                 crops (0.08, 1) + flip, RandAugment m9, mixup 0.8, cutmix 1.0, erasing 0.25), --steps steps
  recipe-epochs  --recipe beit with its own schedule: 100 epochs (1200 steps at batch 32)
  plain+aug      plain's lr, schedule, crops and flip, plus the recipe's RandAugment, erasing,
                 mixup/cutmix and drop path: what the augmentation alone does here
Writes benchmarks/results/finetune_recipe.json (rows of variants not rerun are kept).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

PLAIN = dict(lr=2e-3, warmup_steps=10, layer_decay=0.85, weight_decay=0.05, label_smoothing=0.1,
             crop_scale=(0.6, 1.0), hflip=0.0, seed=0)


def settings(variant, model, steps):
    from beit_jax import finetune

    if variant == "plain":
        return dict(PLAIN, total_steps=steps), 0.0
    recipe, _, drop_path, _ = finetune.recipe_settings("beit", model, 400, batch_size=32,
                                                       steps=None if variant == "recipe-epochs" else steps)
    if variant in ("recipe", "recipe-epochs"):
        return recipe, drop_path
    if variant == "plain+aug":
        aug = {k: recipe[k] for k in ("aa", "reprob", "remode", "mixup", "cutmix", "mixup_prob", "mixup_switch_prob")}
        return dict(PLAIN, total_steps=steps, **aug), drop_path
    raise ValueError(variant)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", nargs="+", default=["plain", "recipe", "plain+aug", "recipe-epochs"])
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()

    import beit_jax
    from beit_jax import finetune
    from tests.test_finetune import _digits_folder

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train_dir = _digits_folder(tmp / "train", n_per_class=40, offset=0)
        val_dir = _digits_folder(tmp / "val", n_per_class=20, offset=1)
        for variant in args.variants:
            probe, _ = beit_jax.create_model("beit_base_patch16_224", num_classes=10, img_size=64, depth=2)
            kwargs, drop_path = settings(variant, probe, args.steps)
            model, variables = beit_jax.create_model("beit_base_patch16_224", num_classes=10, img_size=64, depth=2,
                                                     drop_path_rate=drop_path)
            cfg = finetune.TrainConfig(**kwargs)
            t0 = time.perf_counter()
            out = finetune.train(model, variables, str(train_dir), val_dir=str(val_dir), output_dir=str(tmp / variant),
                                 batch_size=32, cfg=cfg, progress=False, checkpoint_every=10 ** 6)
            losses = [json.loads(line)["loss"] for line in open(tmp / variant / "metrics.jsonl")]
            row = dict(variant=variant, steps=cfg.total_steps, lr=cfg.lr, layer_decay=cfg.layer_decay,
                       drop_path=drop_path, val_top1=out["val"]["top1"], val_top5=out["val"]["top5"],
                       val_count=out["val"]["count"], first_loss=sum(losses[:10]) / 10, last_loss=sum(losses[-10:]) / 10,
                       seconds=time.perf_counter() - t0)
            results.append(row)
            print(json.dumps(row), flush=True)
    path = HERE / "results" / "finetune_recipe.json"
    path.parent.mkdir(exist_ok=True)
    kept = json.loads(path.read_text()) if path.exists() else []  # rows of variants not rerun now stay
    ran = {r["variant"] for r in results}
    results = [r for r in kept if r["variant"] not in ran] + results
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{'variant':<14} {'steps':>5} {'val top1':>8} {'val top5':>8} {'loss first10 -> last10':>24}")
    for r in results:
        print(f"{r['variant']:<14} {r['steps']:>5} {r['val_top1']:>8.3f} {r['val_top5']:>8.3f} "
              f"{r['first_loss']:>11.3f} -> {r['last_loss']:.3f}")


if __name__ == "__main__":
    main()
