"""`beit-jax classify IMG...`: top-k labels of a pretrained BEiT."""
from __future__ import annotations

import json
import sys

from .options import add_model_options, load_model, positive_int


def register(sub) -> None:
    p = sub.add_parser("classify", help="top-k ImageNet labels for images",
                       description="Classify images with a pretrained BEiT (ImageNet-1k or 22k labels).")
    p.add_argument("images", nargs="+", help="image files")
    add_model_options(p)
    p.add_argument("--top-k", type=positive_int, default=5, help="labels to show per image (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--class-names", metavar="FILE",
                   help="class names, one per line or a JSON list (default: classes.json beside the "
                        "checkpoint, ImageNet's for a 1000/21841-class head, else class indices)")
    p.set_defaults(run=run)


def _names(args, num_classes: int, imagenet_names):
    """Labels for the head: --class-names, a fine-tuning run's classes.json beside the checkpoint,
    ImageNet's for a 1000/21841-class head, or None (indices)."""
    import os

    path = args.class_names
    if path is None and args.checkpoint:
        beside = os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "classes.json")
        path = beside if os.path.isfile(beside) else None
    if path is None:
        return imagenet_names(num_classes)
    with open(path) as f:
        text = f.read()
    names = json.loads(text) if text.lstrip().startswith("[") else [line.strip() for line in text.splitlines()
                                                                      if line.strip()]
    if len(names) != num_classes:
        raise ValueError(f"{path} names {len(names)} classes but the model's head has {num_classes}")
    return names


def run(args) -> int:
    import jax
    import numpy as np

    from ..labels import class_names
    from ..models import cast_for_inference
    from ..transforms import ImageLoadError, create_transform, load_image, resolve_data_config

    model, variables = load_model(args)
    variables = cast_for_inference(model, variables)
    transform = create_transform(**resolve_data_config(model))
    if model.num_classes == 0:
        raise ValueError(f"{args.checkpoint or args.model} has no classifier head (num_classes=0): it gives "
                         f"features, not classes; use `beit-jax extract` for features")
    names = _names(args, model.num_classes, class_names)
    if names is None:
        print(f"note: no class names for a {model.num_classes}-class head: showing indices "
              f"(pass --class-names FILE)", file=sys.stderr)
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
