"""beit-jax Flax checkpoint (.msgpack + .json) -> timm-loadable state dict (.safetensors, or .pth / .bin).

    python -m beit_jax.conversion.flax_to_timm out/finetuned.msgpack -o finetuned.safetensors --verify

The result loads with strict=True:
    timm.create_model(ARCH, num_classes=K, pretrained=True,
                      pretrained_cfg_overlay=dict(file="finetuned.safetensors", num_classes=K))
(num_classes in the overlay too: otherwise timm treats the head as foreign and re-initialises it).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

import beit_jax
from beit_jax import checkpoints, mapping
from beit_jax.models import ARCHITECTURES


def load_flax(path: str, model_name=None):
    """(module, variables) from a .msgpack export; its .json gives the architecture and head size."""
    cfg = checkpoints.read_checkpoint_config(path) or {}
    name = model_name or cfg.get("model")
    if not name:
        raise ValueError(f"{path} has no .json config beside it: pass --model ARCH")
    return beit_jax.create_model(name, checkpoint_path=path)


OUTPUT_SUFFIXES = (".safetensors", ".pth", ".bin", ".pt")


def save_state_dict(sd, out: Path) -> None:
    """`sd` as the file type `out`'s name says: safetensors, or a torch.save pickle of tensors."""
    if out.suffix.lower() == ".safetensors":
        checkpoints.save_safetensors(sd, out)
        return
    import torch

    from beit_jax._io import atomic_write

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda f: torch.save({k: torch.from_numpy(np.array(v, order="C", copy=True)) for k, v in sd.items()}, f))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog=f"python -m {__spec__.name if __spec__ else 'conversion.flax_to_timm'}", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="beit-jax .msgpack file (its .json config beside it)")
    ap.add_argument("-o", "--output", required=True,
                    help="output file: .safetensors, or .pth / .bin / .pt (torch.save, as timm's own releases)")
    ap.add_argument("--model", help="architecture, when the .json config is missing")
    ap.add_argument("--verify", action="store_true",
                    help="load the output into timm (strict) and compare logits with the Flax model")
    ap.add_argument("--tolerance", type=float, default=1e-4)
    args = ap.parse_args(argv)
    try:
        out = Path(args.output)
        if args.tolerance <= 0:
            raise ValueError(f"--tolerance must be > 0 (got {args.tolerance})")
        if out.is_dir() or args.output.endswith(("/", os.sep)):
            raise ValueError(f"-o {out} is a folder; give a file name such as {out / 'model.safetensors'}")
        if out.exists():
            raise ValueError(f"-o {out} exists: it is not overwritten; remove it or choose another name")
        if out.suffix.lower() not in OUTPUT_SUFFIXES:
            raise ValueError(f"-o {out}: unknown file type {out.suffix!r}; name it .safetensors, .pth, .bin or .pt "
                             f"(the name decides the format timm reads)")
        model, variables = load_flax(args.checkpoint, args.model)
    except (mapping.CheckpointMismatchError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sd = beit_jax.to_timm_state_dict(variables, model)
    save_state_dict(sd, out)
    overrides = beit_jax.models.architecture_overrides(model)
    print(f"wrote {out} ({len(sd)} tensors, {model.pretrained_cfg.architecture}, num_classes={model.num_classes})")
    if overrides:
        arch = ARCHITECTURES[model.pretrained_cfg.architecture]
        print(f"  timm builds this model with timm.create_model({arch.timm_name!r}, "
              f"{', '.join(f'{k}={v!r}' for k, v in dict(arch.timm_kwargs, **overrides).items())}, "
              f"num_classes={model.num_classes}); the architecture alone does not fit it")
    if args.verify:
        import timm
        import torch

        arch = ARCHITECTURES[model.pretrained_cfg.architecture]
        tm = timm.create_model(arch.timm_name, pretrained=True,
                               **dict(arch.timm_kwargs, **beit_jax.models.architecture_overrides(model),
                                      num_classes=model.num_classes, img_size=model.img_size,
                                      global_pool=model.global_pool),
                               pretrained_cfg_overlay=dict(file=str(out), num_classes=model.num_classes)).eval()
        x = np.random.RandomState(0).randn(2, model.img_size, model.img_size, 3).astype(np.float32)
        with torch.no_grad():
            ref = tm(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
        import jax

        diff = float(np.abs(np.asarray(jax.jit(model.apply)(variables, x)) - ref).max())
        print(f"  timm (strict load) vs Flax: max abs logit difference {diff:.3g}")
        if diff > args.tolerance:
            print(f"FAILED: {diff:.3g} > {args.tolerance:g}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
