"""`beit-jax extract SRC... --output DIR`: features for a large image set on every device."""
from __future__ import annotations

import argparse
import sys

from .options import (add_config_flags, add_distributed_options, add_dtype_option, add_model_options, attention_line,
                      config_from_args, distributed, dtype_of, graceful_stop, json_object, load_model, report_errors,
                      to_cli)


def register(sub) -> None:
    p = sub.add_parser(
        "extract", help="features for a large image set on all devices (resumable)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run a BEiT over every image of SRC on every device (and every host) and write "
                    "features to --output.\n\nSRC and --output: local paths or URLs (s3://, gs://, hf://, "
                    "https:// for reading). SRC: a folder or bucket prefix (recursive), a glob, a list "
                    "file (.txt), a table (.parquet/.csv/.jsonl) with a path/URL column, webdataset .tar "
                    "shards ('shards/{00000..00099}.tar'), or an image.\nOutput: OUT/<output>/*.npy + "
                    "OUT/metadata/*.parquet (id, path, table columns; what embedding-reader and "
                    "autofaiss read), manifest.json and failed.jsonl (unreadable inputs: path, error); "
                    "beit_jax.read_features(OUT) returns (paths, features) in input order.")
    p.add_argument("src", nargs="+", help="image folder/prefix, glob, list file, table, .tar shard(s), image")
    p.add_argument("--output", "-o", required=True,
                   help="output folder or URL (created; refused if it holds another run)")
    p.add_argument("--storage-options", type=json_object, default=None, metavar="JSON",
                   help='fsspec options for every URL, e.g. \'{"anon": true}\' or '
                        '\'{"client_kwargs": {"endpoint_url": "http://..."}}\' (credentials and endpoints '
                        'otherwise come from the usual environment: AWS_*, GOOGLE_APPLICATION_CREDENTIALS)')
    add_model_options(p, num_classes=True)
    add_dtype_option(p, machine_default=True)
    from ..extract import ExtractConfig

    add_config_flags(p, ExtractConfig)
    add_distributed_options(p)
    p.set_defaults(run=run)


def run(args) -> int:
    with distributed(args), graceful_stop() as (stop, received):
        return report_errors(lambda a: _run(a, stop, received), args)


def _run(args, stop, received) -> int:
    import jax

    from ..extract import ExtractConfig, extract
    from ..parallel import inference_defaults
    from ..sources import list_inputs
    from ..storage import Folder

    # what can be refused is refused before the model loads
    Folder(args.output, args.storage_options).check_writable()
    defaults = inference_defaults(args.dtype, args.batch_size)
    cfg = config_from_args(args, ExtractConfig, batch_size=defaults.batch_size)
    inputs = list_inputs(args.src, args.storage_options, cfg.path_column, args.output)
    if defaults.hint and jax.process_index() == 0:
        print(to_cli(defaults.hint), file=sys.stderr, flush=True)
    model, variables = load_model(args, dtype=dtype_of(defaults.dtype))
    if stop.is_set():
        print("interrupted before extraction started; nothing was written", file=sys.stderr)
        return 128 + received[0]
    s = extract(inputs, args.output, model, variables, cfg, model_name=args.model,
                storage_options=args.storage_options, stop=stop)
    if s["interrupted"]:
        if jax.process_index() == 0:
            again = "start a worker with the same command" if cfg.elastic else "run the same command with --resume"
            print(f"interrupted: {s['finished_units']} of {s['units']} units finished and kept in {args.output}; "
                  f"{again} to continue", file=sys.stderr)
        return 128 + (received[0] if received else 2)
    if s.get("elastic"):
        print(f"elastic worker: {s['images']} images, {s['failed']} failed, in {s['claimed_units']} units it claimed "
              f"({s['lost_units']} finished first by another worker and discarded); {s['finished_units']}/{s['units']} "
              f"units of the run finished; {s['seconds']:.1f}s")
        return 0
    if jax.process_index() == 0:
        print(f"{s['images']} images, {s['failed']} failed (see {args.output.rstrip('/')}/failed.jsonl), "
              f"{s['images_per_sec']:.1f} img/s on {s['devices']} devices x {s['processes']} processes; "
              f"{s['seconds']:.1f}s total: waiting for decode {s['decode_wait_s']:.1f}s, "
              f"for the device {s['device_wait_s']:.1f}s, writing {s['write_s']:.1f}s; "
              f"{s['skipped_units']}/{s['units']} units already done")
        print(f"compute: {to_cli(defaults.dtype_note())}, batch {s['batch_size']}; {attention_line(model)}")
    return 0
