"""`beit-jax finetune-seg --data ROOT --output RUN`: fine-tune a BEiT + UPerNet segmenter on an
ADE20K-layout folder with unilm's recipe, on one device or every device of every host."""
from __future__ import annotations

import argparse
import dataclasses
import os

from .options import (add_config_flags, add_dtype_option, add_run_options, distributed, dtype_of, positive_int,
                      read_class_names, report_errors)

DEFAULT_BATCH = 16


def register(sub) -> None:
    p = sub.add_parser(
        "finetune-seg", help="fine-tune a segmenter (BEiT + UPerNet) on an ADE20K-layout folder",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune BEiT + FPN + UPerNet (+ auxiliary FCN head) on ROOT/images/<split>/ with label maps\n"
                    "ROOT/annotations/<split>/<name>.png (ADE20K's layout; 255 = ignore) with unilm's recipe:\n"
                    "AdamW + layer decay, poly lr with linear warmup, auxiliary loss 0.4, random resize 0.5-2.0 +\n"
                    "crop + flip + photometric distortion; mIoU / mAcc / aAcc on the validation split.\n\n"
                    "Writes OUTPUT/checkpoint.msgpack (resumable), metrics.jsonl, eval.jsonl and, when done,\n"
                    "OUTPUT/model/ (a transformers BeitForSemanticSegmentation folder, also read by\n"
                    "create_segmentation_model and `beit-jax segment --model`).")
    p.add_argument("--data", required=True, metavar="ROOT", help="dataset folder holding images/ and annotations/")
    p.add_argument("--train-split", default="training", help="training split (default: %(default)s)")
    p.add_argument("--val-split", default="validation",
                   help="validation split, evaluated every --eval-every steps and at the end; 'none' for no "
                        "validation (default: %(default)s)")
    p.add_argument("--output", "-o", required=True,
                   help="output folder, local or a bucket URL (s3://, gs://; written by process 0, every file whole)")
    p.add_argument("--model", default="beit_base_patch16_224.in22k_ft_in22k",
                   help="where to start: a timm BEiT name (a new FPN + UPerNet on its backbone), a registered "
                        "segmenter (beit_base_upernet_640.ade20k, ...) or a save_pretrained folder "
                        "(default: %(default)s)")
    p.add_argument("--checkpoint", default=None, metavar="FILE",
                   help="a timm BEiT name's weights from a local file instead of the Hub")
    p.add_argument("--random-weights", action="store_true", help="random init (smoke tests only)")
    p.add_argument("--num-classes", type=positive_int, default=None,
                   help="classes of the label maps (default: the --classes file's count, or the model's)")
    p.add_argument("--classes", metavar="FILE", default=None,
                   help="class names, one per line, in label order (the exported config's id2label)")
    p.add_argument("--img-size", type=positive_int, default=None,
                   help="crop size = the model's input size (default: the segmenter's, or 512 for a timm backbone)")
    p.add_argument("--drop-path", type=float, default=None, help="stochastic depth rate (default: the model's)")
    add_dtype_option(p, "master params stay float32")
    p.add_argument("--recipe", choices=["ade20k"], default=None,
                   help="ade20k: unilm's settings for the model's size (base: lr 3e-5, layer decay 0.9, 1500 "
                        "warmup; large: 2e-5, 0.95, 3000; 160k steps at batch 16, the lr scaled linearly to "
                        "--batch-size), reduce_zero_label, slide evaluation; flags given explicitly win")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help=f"global batch over all devices of all hosts (default: {DEFAULT_BATCH})")
    p.add_argument("--max-steps", type=positive_int, default=None, help="stop after this many steps (resume later)")
    from ..finetune.seg import SegTrainConfig

    add_config_flags(p, SegTrainConfig, none_defaults=True)
    add_run_options(p, checkpoint_every=1000, workers_minimum=0)
    p.set_defaults(run=run)


def run(args) -> int:
    with distributed(args):
        return report_errors(_run, args)


def _run(args) -> int:
    import json

    import jax

    from ..finetune.seg import SegTrainConfig, seg_recipe_settings, train_segmenter
    from ..models.segmentation import BeitSegmenter
    from ..segmentation import create_segmentation_model

    names = read_class_names(args.classes) if args.classes else None
    num_classes = args.num_classes or (len(names) if names else None)
    if names and len(names) != num_classes:
        raise ValueError(f"--classes {args.classes} names {len(names)} classes but --num-classes is {num_classes}")
    overrides = {} if args.drop_path is None else {"drop_path_rate": args.drop_path}
    model, variables = create_segmentation_model(args.model, pretrained=not args.random_weights,
                                                 num_classes=num_classes, img_size=args.img_size,
                                                 checkpoint_path=args.checkpoint, dtype=dtype_of(args), **overrides)
    if names:
        model = BeitSegmenter(dataclasses.replace(model.config, id2label=tuple(enumerate(names))), dtype=model.dtype)
    explicit = {f.name: getattr(args, f.name) for f in dataclasses.fields(SegTrainConfig)
                if getattr(args, f.name) is not None}
    kwargs, batch = {}, args.batch_size or DEFAULT_BATCH
    main = jax.process_index() == 0
    if args.recipe:
        kwargs, batch, note = seg_recipe_settings(args.recipe, model, args.batch_size, explicit.get("total_steps"))
        if main:
            print(note + " (flags given explicitly override these)", flush=True)
    cfg = SegTrainConfig(**dict(kwargs, **explicit))
    val_split = None if args.val_split.lower() == "none" else args.val_split
    if val_split and not os.path.isdir(os.path.join(args.data, "images", val_split)):
        raise FileNotFoundError(f"{os.path.join(args.data, 'images', val_split)} is not a folder: pass the validation "
                                f"split's name (--val-split), or --val-split none to train without validation")
    out = train_segmenter(model, variables, args.data, output_dir=args.output, batch_size=batch, cfg=cfg,
                          train_split=args.train_split, val_split=val_split, workers=args.workers,
                          checkpoint_every=args.checkpoint_every, resume=args.resume, max_steps=args.max_steps,
                          eval_every=args.eval_every, progress=not args.no_progress)
    if main:
        print(json.dumps(out, default=float))
    return 0
