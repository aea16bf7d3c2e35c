"""`beit-jax finetune --train SRC --output RUN`: layer-decay fine-tuning on an ImageFolder (local or a
bucket prefix) or a table of paths and labels, on one device or every device of every host."""
from __future__ import annotations

import argparse
import dataclasses
import sys

from .options import (add_config_flags, add_dtype_option, add_model_options, add_run_options, distributed, dtype_of,
                      load_model, positive_int, read_class_names, report_errors)

DEFAULT_BATCH = 32
DEFAULT_DROP_PATH = 0.1


def register(sub) -> None:
    p = sub.add_parser(
        "finetune", help="fine-tune on an ImageFolder, a table or webdataset shards, local or in a bucket "
                         "(layer-decay AdamW, the BEiT recipe, multi-host)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune a BEiT on ROOT/CLASS/IMAGE folders, tables of paths and labels, or webdataset\n"
                    "shards (local or s3://, gs://) with AdamW + layer-wise lr decay, warmup +\n"
                    "cosine, label smoothing and drop path; optionally RandAugment (--aa), random erasing\n"
                    "(--reprob), mixup/cutmix (--mixup/--cutmix) and a weights EMA (--model-ema-decay), or all\n"
                    "of BEiT's published settings for the model's size (--recipe beit).\n\n"
                    "Writes OUTPUT/checkpoint.msgpack (resumable), OUTPUT/metrics.jsonl and, when done,\n"
                    "OUTPUT/model.msgpack + model.json (for create_model(..., checkpoint_path=) and\n"
                    "beit_jax.conversion.flax_to_timm) and OUTPUT/hub/ (timm's Hugging Face Hub layout:\n"
                    "timm.create_model('local-dir:OUTPUT/hub', pretrained=True); `beit-jax push` uploads it).\n\n"
                    "Multi-host: start the same command on every host with --distributed (or --coordinator,\n"
                    "--num-processes, --process-id); --batch-size is the global batch, process 0 writes OUTPUT.")
    p.add_argument("--train", required=True, metavar="SRC",
                   help="training images: an ImageFolder (ROOT/CLASS/IMAGE) folder or bucket prefix (s3://, gs://), "
                        "a table (.parquet/.csv/.jsonl, a glob or {a,b} list of them) of paths/URLs and labels, or "
                        "webdataset shards ('gs://b/train-{00000..01023}.tar', streamed)")
    p.add_argument("--val", metavar="SRC", help="validation images, as --train (top-1/top-5 reported; classes matched "
                                                "to the training classes by name)")
    p.add_argument("--label-column", default=None,
                   help="tables: the column of labels, class indices or names (default: label, labels, class or target)")
    p.add_argument("--path-column", default=None,
                   help="tables: the column of image paths/URLs (default: path, url, image_path or filepath)")
    p.add_argument("--label-key", default="cls",
                   help="shards: the member (cls, label.txt, ...) or .json field holding each sample's label, a class "
                        "index or name (default: %(default)s)")
    p.add_argument("--classes", metavar="FILE", default=None,
                   help="shards: class names, one per line in label order (needed when labels are names; names the "
                        "exported classes)")
    p.add_argument("--num-classes", type=positive_int, default=None,
                   help="shards with class-index labels: the number of classes (default: the --classes count)")
    p.add_argument("--streams", type=positive_int, default=None,
                   help="shards: logical streams, fixed for the run (default: the process count); a resume works on "
                        "any process count that divides it, and --batch-size must be a multiple of it")
    p.add_argument("--shuffle-shards", type=positive_int, default=4,
                   help="shards: each stream shuffles the samples of this many shards at a time (seeded; the "
                        "shuffle buffer: memory grows with it) (default: %(default)s)")
    p.add_argument("--output", "-o", required=True,
                   help="output folder, local or a bucket URL (s3://, gs://; written by process 0, every file whole)")
    add_model_options(p, img_size=True)
    add_dtype_option(p, "master params stay float32")
    p.add_argument("--recipe", choices=["beit"], default=None,
                   help="beit: unilm's published fine-tuning settings for the model (BEiT or BEiT v2, base or "
                        "large): lr (given for batch 1024, scaled linearly to --batch-size), layer decay, drop "
                        "path, epochs and warmup, weight decay 0.05, smoothing 0.1, --aa rand-m9-mstd0.5-inc1, "
                        "--mixup 0.8, --cutmix 1.0, --reprob 0.25; any flag given explicitly wins")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help=f"global batch over all devices of all hosts, a multiple of the device count "
                        f"(default: {DEFAULT_BATCH}; --recipe beit: 1024)")
    p.add_argument("--max-steps", type=positive_int, default=None, help="stop after this many steps (resume later)")
    p.add_argument("--drop-path", type=float, default=None,
                   help=f"stochastic depth rate (default: {DEFAULT_DROP_PATH}; --recipe beit: by model size)")
    from ..finetune import TrainConfig

    add_config_flags(p, TrainConfig, none_defaults=True)
    add_run_options(p, checkpoint_every=100)
    p.set_defaults(run=run)


def run(args) -> int:
    with distributed(args):
        return report_errors(_run, args)


def settings_from_args(args, num_train_images: int, model_name: str):
    """(TrainConfig, global batch, drop path, recipe note or None): the recipe's values (if any),
    then every flag given explicitly on top."""
    from .. import finetune
    from ..models import build_model

    explicit = {f.name: getattr(args, f.name) for f in dataclasses.fields(finetune.TrainConfig)
                if getattr(args, f.name) is not None}
    batch, drop_path, note, kwargs = args.batch_size or DEFAULT_BATCH, DEFAULT_DROP_PATH, None, {}
    if args.recipe:
        module = build_model(model_name, img_size=args.img_size)  # no weights: only its family and width
        kwargs, batch, drop_path, note = finetune.recipe_settings(args.recipe, module, num_train_images,
                                                                  batch_size=args.batch_size,
                                                                  steps=explicit.get("total_steps"))
    kwargs.update(explicit)
    if args.drop_path is not None:
        drop_path = args.drop_path
    return finetune.TrainConfig(**kwargs), batch, drop_path, note


def _run(args) -> int:
    import json

    import jax

    from .. import finetune
    from ..sources import list_labelled, shard_urls

    names = None
    if shard_urls(args.train) is None:
        if args.classes or args.num_classes or args.label_key != "cls" or args.streams:
            raise ValueError(f"--classes, --num-classes, --label-key and --streams are for webdataset shards; "
                             f"{args.train} is a folder or a table, whose classes come from its sub-folders or "
                             f"--label-column")
        refs, _, classes = list_labelled(args.train, args.label_column, args.path_column)
        count = len(refs)
    else:  # streamed: not counted, classes from --classes / --num-classes
        names = read_class_names(args.classes) if args.classes else None
        if not (names or args.num_classes):
            raise ValueError(f"{args.train} is webdataset shards: pass --num-classes K (class-index labels) or "
                             f"--classes FILE (class names, one per line)")
        if names and args.num_classes and len(names) != args.num_classes:
            raise ValueError(f"--classes names {len(names)} classes but --num-classes is {args.num_classes}")
        classes, count = names or [str(i) for i in range(args.num_classes)], None
    cfg, batch, drop_path, note = settings_from_args(args, count, args.model)
    main = jax.process_index() == 0
    if note and main:
        print(note + " (flags given explicitly override these)", flush=True)
    import warnings

    from ..factory import NewHeadWarning

    with warnings.catch_warnings(record=True) as caught:  # a new head is what fine-tuning starts from
        warnings.simplefilter("always", NewHeadWarning)
        model, variables = load_model(args, num_classes=len(classes), drop_path_rate=drop_path, dtype=dtype_of(args))
    for w in caught:
        if issubclass(w.category, NewHeadWarning):
            print(f"note: a new {len(classes)}-class head for {args.train}'s classes (the checkpoint's head is "
                  f"not used)", file=sys.stderr)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    out = finetune.train(model, variables, args.train, val_dir=args.val, output_dir=args.output,
                         batch_size=batch, cfg=cfg, workers=args.workers,
                         checkpoint_every=args.checkpoint_every, resume=args.resume,
                         max_steps=args.max_steps, eval_every=args.eval_every, progress=not args.no_progress,
                         label_column=args.label_column, path_column=args.path_column, label_key=args.label_key,
                         classes=names, streams=args.streams, shuffle_shards=args.shuffle_shards)
    if main:
        print(json.dumps(out, default=float))
    return 0
