"""`beit-jax segment IMG... --output DIR`: label PNGs and colour overlays from a BEiT + UPerNet segmenter."""
from __future__ import annotations

import json
import os
import sys

from .options import add_dtype_option, positive_int


def register(sub) -> None:
    p = sub.add_parser("segment", help="semantic segmentation label maps and overlays for images",
                       description="Segment images with BEiT + UPerNet (transformers' ADE20K checkpoints or any "
                                   "BeitForSemanticSegmentation folder). Writes DIR/<name>.png (a palette PNG of "
                                   "class indices, at the image's size) and DIR/<name>_overlay.jpg.")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--output", required=True, metavar="DIR", help="folder for the PNGs and overlays (made if needed)")
    p.add_argument("--model", default="beit_base_upernet_640.ade20k",
                   help="a registered segmenter (beit_base_upernet_640.ade20k, beit_large_upernet_640.ade20k; "
                        "fetched from the Hub) or a folder written by save_pretrained (default: %(default)s)")
    p.add_argument("--random-weights", action="store_true",
                   help="a registered segmenter with random weights (no download): for smoke tests only")
    p.add_argument("--mode", choices=["whole", "slide"], default="slide",
                   help="whole: the image squashed to the model's size; slide: short side to the model's size, "
                        "overlapping crops (mmseg's ADE20K test setting) (default: %(default)s)")
    p.add_argument("--stride", type=positive_int, default=None,
                   help="slide: pixels between crops (default: 2/3 of the crop, 426 for 640)")
    p.add_argument("--flip", action="store_true", help="add the mirrored image's logits (mmseg's flip test)")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity of the class colours (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=8,
                   help="crops per forward, spread over every device (default: %(default)s)")
    add_dtype_option(p, machine_default=True)
    p.set_defaults(run=run)


def _outputs(args):
    """{image: (png path, overlay path)}, refusing clashes and files already there before any work."""
    out, seen = {}, {}
    for path in args.images:
        stem = os.path.splitext(os.path.basename(path))[0]
        if stem in seen:
            raise ValueError(f"{path} and {seen[stem]} would both write {stem}.png in {args.output}: segment them "
                             f"into different --output folders")
        seen[stem] = path
        out[path] = (os.path.join(args.output, f"{stem}.png"), os.path.join(args.output, f"{stem}_overlay.jpg"))
    there = [p for pair in out.values() for p in pair if os.path.exists(p)]
    there += [p for p in [os.path.join(args.output, "segment.json")] if os.path.exists(p)]
    if there:
        raise FileExistsError(f"{there[0]} already exists ({len(there)} output files do): nothing is overwritten; "
                              f"choose an empty --output folder")
    return out


def run(args) -> int:
    import jax.numpy as jnp
    import numpy as np

    from ..parallel import inference_defaults
    from ..segmentation import create_segmentation_model, device_runner, label_png, overlay, segment
    from ..transforms import ImageLoadError, load_image

    if not 0.0 <= args.alpha <= 1.0:
        raise ValueError(f"--alpha must be between 0 and 1 (got {args.alpha})")
    outputs = _outputs(args)
    defaults = inference_defaults(args.dtype, None)
    dtype = jnp.bfloat16 if defaults.dtype == "bfloat16" else jnp.float32
    model, variables = create_segmentation_model(args.model, pretrained=not args.random_weights, dtype=dtype)
    os.makedirs(args.output, exist_ok=True)  # only once there is a model to write with
    runner = device_runner(model, variables)  # every device of this machine
    names = model.config.label_names
    status, summary = 0, []
    for path, (png, over) in outputs.items():
        try:
            img = load_image(path)
        except ImageLoadError as e:
            print(f"error: {e}", file=sys.stderr)
            status = 1
            continue
        labels = segment(model, variables, img, mode=args.mode, stride=args.stride, flip=args.flip,
                         batch_size=args.batch_size, runner=runner)
        label_png(labels).save(png)
        overlay(img, labels, args.alpha).save(over, quality=90)
        values, sizes = np.unique(labels, return_counts=True)
        counts = dict(zip(values.tolist(), sizes.tolist()))
        top = sorted(counts, key=counts.get, reverse=True)[:3]
        summary.append({"image": path, "labels": png, "overlay": over,
                        "top_classes": [{"index": int(c), "label": names.get(int(c), str(c)),
                                         "fraction": counts[c] / labels.size} for c in top]})
        shares = ", ".join(f"{t['label']} {t['fraction']:.0%}" for t in summary[-1]["top_classes"])
        print(f"{path}: {png} ({shares})")
    print(f"{len(summary)} images segmented on {runner.num_devices} devices ({defaults.dtype}), {args.mode}"
          f"{' + flip' if args.flip else ''}")
    with open(os.path.join(args.output, "segment.json"), "w") as f:
        json.dump({"model": args.model, "mode": args.mode, "stride": args.stride, "flip": args.flip,
                   "dtype": defaults.dtype, "devices": runner.num_devices, "images": summary}, f, indent=2)
    return status
