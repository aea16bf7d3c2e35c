"""The `beit-jax` command: classify | extract | convert | finetune | bench."""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from .cli_commands import REGISTRARS, load_model


def _add_model_args(p: argparse.ArgumentParser, default_model: str = "beit_base_patch16_224") -> None:
    p.add_argument("--model", default=default_model,
                   help="architecture or arch.tag, as in timm (default: %(default)s)")
    p.add_argument("--checkpoint", default=None, metavar="FILE",
                   help="local weights (.safetensors/.pth/.bin timm state dict or beit-jax .msgpack) "
                        "instead of the Hugging Face Hub download")
    p.add_argument("--random-weights", action="store_true",
                   help="skip loading weights (random init): for smoke tests and benchmarks only")


def cmd_classify(args) -> int:
    import jax
    import numpy as np

    import beit_jax
    from beit_jax.labels import class_names
    from beit_jax.transforms import ImageLoadError, load_image

    try:
        model, variables = load_model(args)
    except beit_jax.PretrainedUnavailableError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from beit_jax.model import cast_for_inference

    variables = cast_for_inference(model, variables)
    transform = beit_jax.create_transform(**beit_jax.resolve_data_config(model))
    names = class_names(model.num_classes)
    forward = jax.jit(lambda v, x: jax.nn.softmax(model.apply(v, x).astype("float32"), axis=-1))
    results, status = [], 0
    for path in args.images:
        try:
            x = transform(load_image(path))[None]
        except ImageLoadError as e:
            print(f"error: {e}", file=sys.stderr)
            status = 1
            continue
        probs = np.asarray(forward(variables, x))[0]
        top = np.argsort(-probs)[: args.top_k]
        preds = [{"index": int(i), "label": names[i] if names else str(i), "prob": float(probs[i])} for i in top]
        results.append({"path": str(path), "top_k": preds})
        if not args.json:
            print(path)
            for r in preds:
                print(f"  {r['prob']:7.2%}  {r['label']}  ({r['index']})")
    if args.json:
        print(json.dumps(results, indent=2))
    return status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="beit-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("classify", help="top-k ImageNet labels for images",
                       description="Classify images with a pretrained BEiT (ImageNet-1k or 22k labels).")
    p.add_argument("images", nargs="+", help="image files")
    _add_model_args(p)
    p.add_argument("--top-k", type=int, default=5, help="labels to show per image (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_classify)

    for register in REGISTRARS:
        register(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
