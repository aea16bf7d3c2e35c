"""Sub-commands of `beit-jax` beyond classify; each registers its own parser."""
from __future__ import annotations

import argparse


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
        import sys

        import jax.numpy as jnp

        from beit_jax import parallel

        if args.coordinator or args.distributed:
            parallel.init_distributed(args.coordinator, args.num_processes, args.process_id, args.cpu_collectives)
        import beit_jax
        from beit_jax.cli import _load_model
        from beit_jax.extract import OutputMismatchError, extract

        dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
        try:
            model, variables = _load_model(args, dtype=dtype, num_classes=args.num_classes)
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


def jax_process_index() -> int:
    import jax
    return jax.process_index()


REGISTRARS = [_register_convert, _register_extract]
