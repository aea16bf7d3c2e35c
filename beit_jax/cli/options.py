"""Flags shared by several commands, and what they turn into (a model, a dtype, a cluster)."""
from __future__ import annotations

import argparse
import contextlib
import re
import sys
from typing import List, Optional

DEFAULT_MODEL = "beit_base_patch16_224"


def user_errors() -> tuple:
    """Failures the user can act on: printed as one `error:` line, no traceback."""
    from ..extract import AllInputsFailedError
    from ..finetune import TrainingDivergedError
    from ..hub import PretrainedUnavailableError
    from ..mapping import CheckpointMismatchError
    from ..publish import PushError
    from ..sinks import CorruptOutputError, OutputMismatchError
    from ..storage import OutputLockedError, StorageFullError

    return (PretrainedUnavailableError, CheckpointMismatchError, OutputMismatchError, CorruptOutputError,
            AllInputsFailedError, TrainingDivergedError, OutputLockedError, StorageFullError, PushError, ValueError,
            FileNotFoundError,
            FileExistsError, NotADirectoryError, PermissionError, ImportError)


# The library's messages name Python parameters in backticks (`resume=True`, `shard_size`); the
# command says its flags instead. This table and the config dataclasses' fields (flag_table) are
# the one place that maps them.
FLAG_OF = {"output_dir": "--output", "checkpoint_path": "--checkpoint", "train_dir": "--train", "val_dir": "--val",
           "storage_options": "--storage-options", "dtype": "--dtype", "model": "--model", "img_size": "--img-size",
           "num_classes": "--num-classes", "name_or_path": "--model", "label_column": "--label-column",
           "path_column": "--path-column", "label_key": "--label-key", "classes": "--classes", "streams": "--streams",
           "shuffle_shards": "--shuffle-shards", "batch_size": "--batch-size", "steps": "--steps",
           "reduce_zero_label": "--reduce-zero-label"}
_PARAM = re.compile(r"`([a-z_]+(?:=[^`,]*)?(?:, [a-z_]+(?:=[^`,]*)?)*)`")


def _flag_of_field(f) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def flag_table() -> dict:
    """{Python parameter: flag}: FLAG_OF plus every ExtractConfig / TrainConfig field's flag."""
    import dataclasses

    from ..extract import ExtractConfig
    from ..finetune import TrainConfig

    table = {f.name: _flag_of_field(f) for cls in (ExtractConfig, TrainConfig) for f in dataclasses.fields(cls)
             if f.metadata.get("cli", True)}
    return dict(table, **FLAG_OF)


def to_cli(message: str) -> str:
    """A library message as the command says it: each backticked parameter it knows becomes its
    flag (`resume=True` -> --resume, `batch_size=96` -> --batch-size 96, `shard_size` ->
    --shard-size); anything else stays as written."""
    flags = flag_table()

    def flag(token: str) -> Optional[str]:
        name, eq, value = token.partition("=")
        if name not in flags:
            return None
        if not eq or value == "True":
            return flags[name]
        return flags[name] + " " + value.strip("'")

    def sub(m):
        said = [flag(t) for t in m.group(1).split(", ")]
        return " ".join(said) if all(said) else m.group(0)

    return _PARAM.sub(sub, str(message))


def report_errors(run, args) -> int:
    """run(args), turning an error the user can act on into one `error:` line and exit code 2."""
    try:
        return int(run(args) or 0)
    except Exception as e:
        if not isinstance(e, user_errors()):
            raise
        print(f"error: {to_cli(e)}", file=sys.stderr, flush=True)
        return 2


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer (got {text})")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more (got {text})")
    return value


def comma_list(text: str) -> tuple:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def add_config_flags(p, config_cls, *, none_defaults: bool = False) -> None:
    """A flag per field of a config dataclass (`beit_jax._config.option`): `--field-name` or the
    field's own flag, its help and default from the field, so the library and the CLI have one
    source. Ints with a minimum are checked when parsing; everything else by the config itself.
    none_defaults: flags left out stay None (finetune's --recipe tells them apart)."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        meta = f.metadata
        if not meta.get("cli", True):
            continue
        flag = _flag_of_field(f)
        kinds = [t for t in (typing.get_args(hints[f.name]) or (hints[f.name],)) if t is not type(None)]
        default = None if none_defaults else f.default
        shown = "" if f.default is None else f" (default: {' '.join(map(str, f.default)) if isinstance(f.default, tuple) else f.default})"
        kw = dict(dest=f.name, default=default, help=meta["help"] + shown)
        if hints[f.name] is bool:  # a True-by-default field's flag turns it off
            kw.update(action="store_false" if f.default else "store_true",
                      help=f"do not {meta['help']}" if f.default else meta["help"])
            p.add_argument(flag, **kw)
            continue
        kw["metavar"] = flag.lstrip("-").upper().replace("-", "_")
        if isinstance(f.default, tuple) and Ellipsis in typing.get_args(hints[f.name]):
            kw.update(type=comma_list, help=meta["help"] + f" (default: {','.join(f.default)})")
        elif isinstance(f.default, tuple):
            kw.update(type=kinds[0], nargs=len(f.default), metavar=("MIN", "MAX"))
        elif meta.get("minimum") is not None and kinds[0] is int:
            kw.update(type=positive_int if meta["minimum"] == 1 else non_negative_int)
        else:
            kw.update(type=kinds[0])
        if meta.get("choices"):
            kw.update(choices=meta["choices"])
        p.add_argument(flag, **kw)


def config_from_args(args, config_cls, **fixed):
    """The config the flags made (add_config_flags), with `fixed` fields set by the caller."""
    import dataclasses

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls) if hasattr(args, f.name)}
    return config_cls(**dict(values, **fixed))


def json_object(text: str) -> dict:
    import json

    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {text}")
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, e.g. '{{\"anon\": true}}' (got {text})")
    return value


def add_model_options(p: argparse.ArgumentParser, *, num_classes: bool = False, img_size: bool = False) -> None:
    """--model, --checkpoint, --random-weights (and optionally --num-classes / --img-size)."""
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="architecture or arch.tag, as in timm (default: %(default)s)")
    p.add_argument("--checkpoint", default=None, metavar="FILE",
                   help="local weights (.safetensors/.pth/.bin timm state dict or beit-jax .msgpack) "
                        "instead of the Hugging Face Hub download")
    p.add_argument("--random-weights", action="store_true",
                   help="skip loading weights (random init): for smoke tests and benchmarks only")
    if num_classes:
        p.add_argument("--num-classes", type=non_negative_int, default=None,
                       help="head size; 0 drops the head (default: the tag's, or the checkpoint's)")
    if img_size:
        p.add_argument("--img-size", type=positive_int, default=None,
                       help="input resolution (position tables are resized; default: the tag's)")


def add_dtype_option(p: argparse.ArgumentParser, what: str = "params, LayerNorm and softmax stay float32",
                     machine_default: bool = False) -> None:
    """--dtype; machine_default: left unset (None) it means parallel.inference_defaults' choice."""
    default = "bfloat16 on GPU/TPU, float32 on CPU" if machine_default else "%(default)s"
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None if machine_default else "float32",
                   help=f"compute dtype; {what} (default: {default})")


def add_distributed_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--coordinator", help="multi-host: coordinator address host:port (with --num-processes/--process-id)")
    p.add_argument("--num-processes", type=positive_int, help="multi-host: number of processes")
    p.add_argument("--process-id", type=non_negative_int, help="multi-host: this process's id")
    p.add_argument("--distributed", action="store_true",
                   help="multi-host: jax.distributed.initialize() with cluster auto-detection (TPU pods, SLURM)")
    p.add_argument("--cpu-collectives", choices=["gloo", "mpi"], help="CPU multi-process collectives (testing)")
    p.add_argument("--host-timeout", type=float, default=None, metavar="SECONDS",
                   help="multi-host: a process silent this long counts as lost, and the others stop at once "
                        "with a message and exit status 75 (default: 30)")


@contextlib.contextmanager
def distributed(args):
    """jax.distributed for the command's lifetime when asked for; left right after the command's
    last barrier, not at interpreter exit. (Report errors inside it: leaving waits for the other
    processes.)"""
    from .. import parallel

    on = bool(args.coordinator or args.distributed)
    if on:
        parallel.init_distributed(args.coordinator, args.num_processes, args.process_id, args.cpu_collectives,
                                  args.host_timeout)
    try:
        yield
    finally:
        if on:
            parallel.shutdown_distributed()


@contextlib.contextmanager
def graceful_stop():
    """Ctrl-C / SIGTERM set an Event the work loop checks between batches (finished work is kept,
    nothing is torn mid-write or mid-compile); a second signal ends the process at once.
    Yields (event, received signal numbers)."""
    import os
    import signal
    import threading

    stop, received = threading.Event(), []

    def handler(signum, frame):
        name = signal.Signals(signum).name
        if stop.is_set():
            print(f"\n{name} again: stopped at once; finished work is kept (--resume continues)",
                  file=sys.stderr, flush=True)
            os._exit(128 + signum)
        received.append(signum)
        stop.set()
        print(f"\n{name}: stopping after the current batch; finished work is kept (again to stop at once)",
              file=sys.stderr, flush=True)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop, received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def dtype_of(args_or_name):
    """The jnp dtype of --dtype (or of a dtype name)."""
    import jax.numpy as jnp
    name = args_or_name if isinstance(args_or_name, str) else args_or_name.dtype
    return jnp.bfloat16 if name == "bfloat16" else jnp.float32


def attention_line(model) -> str:
    """'attention: xla' / 'attention: cudnn', with why not cuDNN where one could expect it
    (an NVIDIA GPU, or attn_impl='cudnn' asked for)."""
    from ..layers import backend_platform

    impl, why = model.attention_impl()
    shown = why and (model.attn_impl == "cudnn" or backend_platform() == "cuda")
    return f"attention: {impl}" + (f" ({why})" if shown else "")


def load_model(args, **kwargs):
    """(module, variables) for --model with --random-weights, --checkpoint or the Hub download."""
    from ..factory import create_model

    for flag in ("num_classes", "img_size"):
        if getattr(args, flag, None) is not None:
            kwargs.setdefault(flag, getattr(args, flag))
    if args.random_weights:
        return create_model(args.model, **kwargs)
    return create_model(args.model, pretrained=args.checkpoint is None, checkpoint_path=args.checkpoint, **kwargs)


def read_class_names(path: str) -> List[str]:
    """A --classes FILE: class names, one per line in label order."""
    with open(path) as f:
        lines = [line.strip() for line in f.read().rstrip("\n").split("\n")]
    if not any(lines):
        raise ValueError(f"{path} names no classes (one name per line)")
    if "" in lines:
        raise ValueError(f"{path}: line {lines.index('') + 1} is empty: one class name per line, in label order "
                         f"(an empty line would shift every later name against its label)")
    dup = sorted({n for n in lines if lines.count(n) > 1})
    if dup:
        raise ValueError(f"{path} names {dup[:5]} more than once: every class needs its own name")
    return lines


def add_run_options(p: argparse.ArgumentParser, *, checkpoint_every: int, workers_minimum: int = 1) -> None:
    """The training loop's flags (fine-tuning and segmentation fine-tuning): decode workers,
    checkpoint and validation cadence, --resume, --no-progress, and the multi-host flags."""
    p.add_argument("--workers", type=positive_int if workers_minimum else non_negative_int, default=2,
                   help="decode threads per host (default: %(default)s)")
    p.add_argument("--checkpoint-every", type=positive_int, default=checkpoint_every,
                   help="steps between checkpoints (default: %(default)s)")
    p.add_argument("--eval-every", type=positive_int, default=None, help="steps between validations (default: at the end)")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint.msgpack")
    p.add_argument("--no-progress", action="store_true", help="do not show a progress bar")
    add_distributed_options(p)
