"""timm BEiT / BEiT-3 checkpoint -> beit-jax Flax checkpoint (.msgpack + .json), with optional verification.

    python -m beit_jax.conversion.timm_to_flax beit_base_patch16_224 --pretrained -o out/beit_base
    python -m beit_jax.conversion.timm_to_flax release.pth --model beit_large_patch16_224 -o out/large \
        --verify --images photos/

The output loads with `beit_jax.create_model(NAME, checkpoint_path="out/beit_base.msgpack")`.
Format: flax.serialization msgpack (one self-contained file, readable without torch, restored
straight into numpy) plus a JSON config. The key mapping is `beit_jax.mapping`'s (one copy): this
module only adds torch-side IO and checks.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Dict, Optional

import numpy as np

import beit_jax
from beit_jax import checkpoints, mapping
from beit_jax.models import ARCHITECTURES


def read_source(source: str, pretrained: bool) -> Dict[str, np.ndarray]:
    """A timm state dict from a checkpoint file, or from timm itself for a model name (--pretrained)."""
    if os.path.exists(source):
        return checkpoints.load_state_dict_file(source)
    if not pretrained:
        raise ValueError(f"{source} is not a file; for a timm model name add --pretrained")
    import timm

    tm = timm.create_model(source, pretrained=True)
    return {k: v.detach().cpu().float().numpy() for k, v in tm.state_dict().items()}


def infer_num_classes(sd) -> int:
    sd = mapping.unwrap_state_dict(sd)
    return int(np.shape(sd["head.weight"])[0]) if "head.weight" in sd else 0


def convert(sd, model_name: str, num_classes: Optional[int] = None, img_size: Optional[int] = None):
    """(module, variables) for `model_name` from a timm state dict; raises before anything is written."""
    sd = dict(mapping.unwrap_state_dict(sd))
    if num_classes is None:
        num_classes = infer_num_classes(sd)
    model = beit_jax.build_model(model_name, num_classes=num_classes, img_size=img_size)
    if num_classes == 0:
        sd.pop("head.weight", None)
        sd.pop("head.bias", None)
    return model, beit_jax.convert_timm_state_dict(sd, model)


def timm_reference(sd, model):
    """The timm model the checkpoint belongs to, loaded strictly through timm's own filter."""
    import importlib

    import timm
    import torch

    arch = ARCHITECTURES[model.pretrained_cfg.architecture]
    tm = timm.create_model(arch.timm_name, pretrained=False, **dict(arch.timm_kwargs, num_classes=model.num_classes,
                           img_size=model.img_size, global_pool=model.global_pool)).eval()
    # The filter of the timm module defining the model (timm.models.beit, .vision_transformer for BEiT-3).
    checkpoint_filter_fn = importlib.import_module(type(tm).__module__).checkpoint_filter_fn
    tsd = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in mapping.unwrap_state_dict(sd).items()}
    if model.num_classes == 0:
        tsd = {k: v for k, v in tsd.items() if not k.startswith("head.")}
    tm.load_state_dict(checkpoint_filter_fn(tsd, tm), strict=True)
    return tm


def verify(model, variables, tm, images_dir: Optional[Path], num_images: int = 16, batch: int = 8,
           seed: int = 0) -> Dict[str, float]:
    """Run timm and Flax side by side on random inputs and real images; return the differences."""
    import jax
    import torch

    from beit_jax.transforms import ImageLoadError, load_image

    fwd = jax.jit(lambda v, x: model.apply(v, x, method="forward_features"))
    head = jax.jit(lambda v, t: model.apply(v, t, method="forward_head"))

    def compare(x):
        with torch.no_grad():
            t_feats = tm.forward_features(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
            t_logits = tm.forward_head(t_feats).numpy()
        feats = fwd(variables, x)
        logits = np.asarray(head(variables, feats))
        return np.abs(np.asarray(feats) - t_feats.numpy()).max(), logits, t_logits

    size = model.img_size
    rand = np.random.RandomState(seed).randn(2, size, size, 3).astype(np.float32)
    d_feat, logits, t_logits = compare(rand)
    report = {"random_max_abs_features": float(d_feat),
              "random_max_abs_logits": float(np.abs(logits - t_logits).max())}
    if images_dir is None:
        print("  (no --images: verified on random inputs only)")
    else:
        transform = beit_jax.create_transform(**beit_jax.resolve_data_config(model))
        xs = []
        for p in sorted(Path(images_dir).iterdir()):
            if len(xs) == num_images:
                break
            try:
                xs.append(transform(load_image(p)))
            except ImageLoadError:
                continue
        all_l, all_t, d_feats = [], [], []
        for i in range(0, len(xs), batch):
            d, l, t = compare(np.stack(xs[i:i + batch]))
            d_feats.append(d)
            all_l.append(l)
            all_t.append(t)
        if all_l:
            l, t = np.concatenate(all_l), np.concatenate(all_t)
            report.update(images=len(xs), images_max_abs_features=float(max(d_feats)))
            if model.num_classes > 0:
                k = min(5, model.num_classes)
                top5 = np.argsort(-l, -1)[:, :k]
                t_top5 = np.argsort(-t, -1)[:, :k]
                report.update(images_max_abs_logits=float(np.abs(l - t).max()),
                              top1_agreement=float(np.mean(top5[:, 0] == t_top5[:, 0])),
                              top5_agreement=float(np.mean([set(a) == set(b) for a, b in zip(top5, t_top5)])))
    return report


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The command line of this tool (also `beit-jax convert`)."""
    ap.add_argument("source", help="checkpoint file (.safetensors/.pth/.bin) or timm model name (with --pretrained)")
    ap.add_argument("--pretrained", action="store_true", help="SOURCE is a timm model name: load timm's weights")
    ap.add_argument("--model", help="beit-jax architecture or arch.tag (default: SOURCE when it is a name)")
    ap.add_argument("--num-classes", type=int, default=None,
                    help="head size (default: the checkpoint's; 0 drops the head)")
    ap.add_argument("--img-size", type=int, default=None, help="input size; position tables are resized")
    ap.add_argument("-o", "--output", help="output path (writes OUTPUT.msgpack and OUTPUT.json)")
    ap.add_argument("--verify", action="store_true", help="compare against timm on random inputs and real images")
    ap.add_argument("--images", type=Path, default=None,
                    help="folder of real images for --verify (without it, random inputs only)")
    ap.add_argument("--num-images", type=int, default=16, help="images for --verify (default: %(default)s)")
    ap.add_argument("--tolerance", type=float, default=1e-4,
                    help="max abs logit/feature difference --verify accepts (default: %(default)s)")


_NOT_AN_EXPORT_NAME = (".json", ".pth", ".bin", ".pt", ".ckpt", ".safetensors", ".npz", ".npy")


def output_path(output: str, model) -> str:
    """-o as given (OUT or OUT.msgpack: writes OUT.msgpack + OUT.json), or inside it as
    `<architecture>.msgpack` when it names a folder; checked before anything is converted."""
    if output.endswith(("/", os.sep)) or os.path.isdir(output):
        output = os.path.join(output, model.pretrained_cfg.architecture + checkpoints.FLAX_CHECKPOINT_SUFFIX)
    elif os.path.splitext(output)[1].lower() in _NOT_AN_EXPORT_NAME:
        raise ValueError(f"-o {output}: a beit-jax export is OUT.msgpack + OUT.json; give -o without the "
                         f"{os.path.splitext(output)[1]} suffix (or ending in .msgpack)")
    parent = os.path.dirname(os.path.abspath(output))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    try:  # a probe file in the nearest existing folder (permissions alone miss read-only mounts, /proc)
        if not os.path.isdir(parent):
            raise NotADirectoryError(f"{parent} is a file")
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as e:
        raise ValueError(f"-o {output}: cannot write there ({parent}: {e.strerror or e})") from e
    return checkpoints.export_paths(output)[0]


def run(args) -> int:
    """The tool; every refusal is one `error:` line and exit code 2, before anything is written."""
    try:
        model_name = args.model or (args.source if not os.path.exists(args.source) else None)
        if model_name is None:
            raise ValueError(f"{args.source} is a checkpoint file: pass --model ARCH "
                             f"(beit_jax.list_models() lists them)")
        if not args.output and not args.verify:
            raise ValueError("nothing to do: give --output and/or --verify")
        if args.images is not None and not args.images.is_dir():
            raise ValueError(f"--images {args.images} is not a folder")
        if args.tolerance <= 0:
            raise ValueError(f"--tolerance must be > 0 (got {args.tolerance})")
        sd = read_source(args.source, args.pretrained)
        model, variables = convert(sd, model_name, args.num_classes, args.img_size)
        out = output_path(args.output, model) if args.output else None
    except (mapping.CheckpointMismatchError, ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"converted {args.source} -> {model.pretrained_cfg.architecture} "
          f"(num_classes={model.num_classes}, img_size={model.img_size})")
    status = 0
    if args.verify:
        report = verify(model, variables, timm_reference(sd, model), args.images, args.num_images)
        for k, v in report.items():
            print(f"  {k}: {v:.3g}" if isinstance(v, float) else f"  {k}: {v}")
        worst = max(v for k, v in report.items() if "max_abs" in k)
        if worst > args.tolerance:
            print(f"FAILED: max abs difference {worst:.3g} > tolerance {args.tolerance:g}", file=sys.stderr)
            status = 1
        else:
            print(f"OK: max abs difference {worst:.3g} <= {args.tolerance:g}")
    if args.output and status == 0:
        mp, js = checkpoints.save_flax_checkpoint(variables, model, out)
        print(f"wrote {mp} and {js}")
    return status



def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog=f"python -m {__spec__.name if __spec__ else 'conversion.timm_to_flax'}", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
