"""Sub-commands of `beit-jax` beyond classify; each registers its own parser. (cli.py imports this
module, never the other way round.)"""
from __future__ import annotations

import argparse


def load_model(args, **kwargs):
    """(module, variables) for --model with --random-weights, --checkpoint or the Hub download."""
    import beit_jax

    if args.random_weights:
        return beit_jax.create_model(args.model, **kwargs)
    return beit_jax.create_model(args.model, pretrained=args.checkpoint is None,
                                 checkpoint_path=args.checkpoint, **kwargs)


def _register_convert(sub) -> None:
    p = sub.add_parser("convert", help="timm checkpoint -> beit-jax checkpoint (same as python -m conversion.timm_to_flax)",
                       add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)

    def run(args):
        from conversion.timm_to_flax import main
        return main(args.rest)

    p.set_defaults(func=run)


def _register_extract(sub) -> None:
    p = sub.add_parser(
        "extract", help="features for a large image set on all devices (resumable)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run a BEiT over every image of SRC on every device (and every host) and write "
                    "features to --output.\n\nSRC: a folder (recursive), a text file listing paths, "
                    "a .tar shard or a glob of them ('shards/*.tar').\nOutput: shard-*.npz files, "
                    "manifest.json and failed.jsonl (unreadable inputs: path, error); "
                    "beit_jax.read_features(DIR) returns (paths, features) in input order.")
    p.add_argument("src", nargs="+", help="image folder, list file, .tar shard(s) or glob")
    p.add_argument("--output", "-o", required=True, help="output folder (created; refused if it holds another run)")
    p.add_argument("--model", default="beit_base_patch16_224", help="architecture or arch.tag (default: %(default)s)")
    p.add_argument("--checkpoint", metavar="FILE", help="local weights instead of the Hub download")
    p.add_argument("--random-weights", action="store_true", help="random init (pipeline tests/benchmarks only)")
    p.add_argument("--num-classes", type=int, default=None,
                   help="head size; 0 drops the head (default: the tag's, or the checkpoint's)")
    p.add_argument("--batch-size", type=int, default=64,
                   help="global batch over all devices of all hosts; a multiple of the device count (default: %(default)s)")
    p.add_argument("--parallel", choices=["sharded", "pmap"], default="sharded",
                   help="sharded: jax.jit over a device Mesh (all hosts); pmap: jax.pmap over local devices "
                        "(default: %(default)s)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="compute dtype; params, LayerNorm and softmax stay float32 (default: %(default)s)")
    p.add_argument("--workers", type=int, default=2,
                   help="decode workers per host; 0 decodes inline (default: %(default)s)")
    p.add_argument("--backend", choices=["thread", "process"], default="thread",
                   help="decode worker kind: threads (PIL releases the GIL) or spawned processes (default: %(default)s)")
    p.add_argument("--outputs", default="pooled",
                   help="comma list of pooled (B, D), tokens (B, 1+N, D), logits (default: %(default)s)")
    p.add_argument("--shard-size", type=int, default=4096, help="rows per shard file per host (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue a killed run in the same folder: finished shards are kept")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--coordinator", help="multi-host: coordinator address host:port (with --num-processes/--process-id)")
    p.add_argument("--num-processes", type=int, help="multi-host: number of processes")
    p.add_argument("--process-id", type=int, help="multi-host: this process's id")
    p.add_argument("--distributed", action="store_true",
                   help="multi-host: jax.distributed.initialize() with cluster auto-detection (TPU pods, SLURM)")
    p.add_argument("--cpu-collectives", choices=["gloo", "mpi"], help="CPU multi-process collectives (testing)")

    def run(args):
        from beit_jax import parallel

        distributed = bool(args.coordinator or args.distributed)
        if distributed:
            parallel.init_distributed(args.coordinator, args.num_processes, args.process_id, args.cpu_collectives)
        try:
            return _run_extract(args)
        finally:
            if distributed:  # leave together, right after the last barrier, not at interpreter exit
                import jax
                jax.distributed.shutdown()

    def _run_extract(args):
        import sys

        import jax.numpy as jnp

        import beit_jax
        from beit_jax.extract import OutputMismatchError, extract

        dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
        try:
            model, variables = load_model(args, dtype=dtype, num_classes=args.num_classes)
            summary = extract(args.src, args.output, model, variables, model_name=args.model,
                              batch_size=args.batch_size, parallel=args.parallel,
                              outputs=[o.strip() for o in args.outputs.split(",") if o.strip()],
                              workers=args.workers, backend=args.backend, resume=args.resume,
                              shard_size=args.shard_size, progress=not args.no_progress)
        except (beit_jax.PretrainedUnavailableError, OutputMismatchError, ValueError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        s = summary
        if s["processes"] == 1 or jax_process_index() == 0:
            print(f"{s['images']} images, {s['failed']} failed (see {args.output}/failed.jsonl), "
                  f"{s['images_per_sec']:.1f} img/s on {s['devices']} devices x {s['processes']} processes; "
                  f"{s['seconds']:.1f}s total: waiting for decode {s['decode_wait_s']:.1f}s, "
                  f"for the device {s['device_wait_s']:.1f}s, writing {s['write_s']:.1f}s; "
                  f"{s['skipped_shards']}/{s['shards']} shards already done")
        return 0

    p.set_defaults(func=run)


def _register_finetune(sub) -> None:
    p = sub.add_parser(
        "finetune", help="fine-tune on an ImageFolder (layer-decay AdamW, the BEiT recipe)",
        description="Fine-tune a BEiT on ROOT/CLASS/IMAGE folders with AdamW + layer-wise lr decay, "
                    "warmup + cosine, label smoothing and drop path. Writes OUTPUT/checkpoint.msgpack "
                    "(resumable), OUTPUT/metrics.jsonl and, when done, OUTPUT/model.msgpack + model.json "
                    "(loadable by create_model(..., checkpoint_path=) and conversion.flax_to_timm).")
    p.add_argument("--train", required=True, help="training ImageFolder")
    p.add_argument("--val", help="validation ImageFolder (top-1/top-5 reported)")
    p.add_argument("--output", "-o", required=True, help="output folder")
    p.add_argument("--model", default="beit_base_patch16_224", help="architecture or arch.tag (default: %(default)s)")
    p.add_argument("--checkpoint", metavar="FILE", help="starting weights instead of the Hub download")
    p.add_argument("--random-weights", action="store_true", help="start from random init (smoke tests only)")
    p.add_argument("--img-size", type=int, default=None, help="train resolution (position tables are resized)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="compute dtype; master params stay float32 (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="global batch (default: %(default)s)")
    p.add_argument("--steps", type=int, default=1000, help="total optimizer steps (default: %(default)s)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (resume later)")
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (default: %(default)s)")
    p.add_argument("--min-lr", type=float, default=1e-6)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--layer-decay", type=float, default=0.65, help="layer-wise lr decay (default: %(default)s)")
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--drop-path", type=float, default=0.1, help="stochastic depth rate (default: %(default)s)")
    p.add_argument("--grad-accum", type=int, default=1, help="accumulate gradients over N batches")
    p.add_argument("--crop-scale", type=float, nargs=2, default=(0.08, 1.0), metavar=("MIN", "MAX"),
                   help="RandomResizedCrop area range (default: timm's 0.08 1.0)")
    p.add_argument("--hflip", type=float, default=0.5, help="horizontal flip probability (default: %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="decode threads (default: %(default)s)")
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints")
    p.add_argument("--eval-every", type=int, default=None, help="steps between validations (default: at the end)")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint.msgpack")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")

    def run(args):
        import json
        import sys

        import jax.numpy as jnp

        import beit_jax
        from beit_jax import finetune
        from beit_jax.data import list_image_folder

        _, _, classes = list_image_folder(args.train)
        dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
        try:
            model, variables = load_model(args, num_classes=len(classes), img_size=args.img_size,
                                           drop_path_rate=args.drop_path, dtype=dtype)
        except beit_jax.PretrainedUnavailableError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        cfg = finetune.TrainConfig(lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
                                   layer_decay=args.layer_decay, warmup_steps=args.warmup_steps,
                                   total_steps=args.steps, label_smoothing=args.label_smoothing,
                                   grad_accum=args.grad_accum, seed=args.seed,
                                   crop_scale=tuple(args.crop_scale), hflip=args.hflip)
        out = finetune.train(model, variables, args.train, val_dir=args.val, output_dir=args.output,
                             batch_size=args.batch_size, cfg=cfg, workers=args.workers,
                             checkpoint_every=args.checkpoint_every, resume=args.resume,
                             max_steps=args.max_steps, eval_every=args.eval_every, progress=not args.no_progress)
        print(json.dumps({k: v for k, v in out.items()}, default=float))
        return 0

    p.set_defaults(func=run)


def _register_bench(sub) -> None:
    p = sub.add_parser("bench", help="model forward throughput on this machine's devices",
                       description="Time the jitted forward (random weights, synthetic input) on all local "
                                   "devices: compile time, images/s, achieved GFLOP/s. For peer comparisons "
                                   "see benchmarks/ in the repository.")
    p.add_argument("--model", default="beit_base_patch16_224")
    p.add_argument("--batch-size", type=int, nargs="+", default=[1, 8, 32], help="global batch sizes")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--attn-impl", choices=["xla", "dot_product_attention"], default="xla")
    p.add_argument("--seconds", type=float, default=5.0, help="time to measure per batch size")

    def run(args):
        import time

        import jax
        import jax.numpy as jnp
        import numpy as np

        import beit_jax
        from beit_jax import parallel
        from beit_jax.model import cast_for_inference, default_micro_batch

        dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
        model, variables = beit_jax.create_model(args.model, dtype=dtype, attn_impl=args.attn_impl)
        gflop = model.gflop_per_image
        print(f"{args.model} {args.dtype} on {jax.device_count()} x {jax.devices()[0].device_kind}; "
              f"{gflop:.1f} GFLOP/image")
        for batch in args.batch_size:
            dp = parallel.DataParallel(lambda v, x: model.apply(v, x), mode="sharded",
                                       micro_batch=default_micro_batch())
            params = dp.replicate(cast_for_inference(model, variables))
            x = np.random.RandomState(0).randn(batch, model.img_size, model.img_size, 3).astype(np.float32)
            t = time.perf_counter()
            jax.block_until_ready(dp(params, dp.put_batch(x)))
            compile_s = time.perf_counter() - t
            steps, t = 0, time.perf_counter()
            while time.perf_counter() - t < args.seconds or steps < 2:
                jax.block_until_ready(dp(params, dp.put_batch(x)))
                steps += 1
            ips = steps * batch / (time.perf_counter() - t)
            print(f"batch {batch:4d}: {ips:8.2f} img/s  {ips * gflop:8.0f} GFLOP/s  (compile {compile_s:.1f}s)")
        return 0

    p.set_defaults(func=run)


def jax_process_index() -> int:
    import jax
    return jax.process_index()


REGISTRARS = [_register_convert, _register_extract, _register_finetune, _register_bench]
