"""Feature extraction over large image sets: any storage, every device of every host, resumable,
nothing lost or duplicated.

Source -> Plan -> Sink, composed by `extract`:
  Inputs         (sources.py) what SRC names: listed ImageRefs, and Streamed sources (tar shards)
  Plan           the inputs cut into units of work (`shard_size` listed inputs, or one streamed
                 source), each process a contiguous block of units, every row a key in input order
  Manifest       what the output folder holds (model, weights, inputs, layout); refuses to mix runs
  run_pipeline   decode -> device -> writer, the device step of batch i overlapping the read-back
                 and writing of batch i - 1; processes step in lockstep until all are done
  Sink           (sinks.py) FeatureWriter: npy + parquet parts per unit, then the unit's marker

Output layout: see sinks.py (npy + parquet, what embedding-reader/autofaiss read), plus
  manifest.json   identity of the run, status running/complete, totals
  failed.jsonl    {"path", "error"} per unreadable input (gathered at the end)
A unit is finished when its marker exists (objects and local files are written whole), so a run
killed at any point and resumed with `resume=True` has exactly the rows of an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from . import parallel as par
from ._config import option
from ._io import TEMP_MARKER
from .data import Decoder, HostBatch, stream_batches
from .elastic import Leases, claimed_units
from .models import cast_for_inference
from .sinks import (FAILED, MANIFEST, OUTPUTS, STORAGE_DTYPES, UNITS, CorruptOutputError, FeatureWriter, OutputMismatchError, Sink,  # noqa: F401
                    finished_units, iter_features, read_failures, read_features, read_manifest, remove_unfinished_parts)
from .sources import IMAGE_EXTENSIONS, ImageRef, Inputs, Listed, RefList, Streamed, list_inputs, prefetch
from .storage import Folder, OutputLockedError, StorageFullError, WriterLock
from .transforms import DECODE_MODES, create_transform, normalize, resolve_data_config

FORMAT = "beit-jax/features-v2"


class AllInputsFailedError(RuntimeError):
    """No input could be read: the run is complete but holds no features."""


# ---- the per-device function --------------------------------------------------------------------
def make_forward(model, outputs: Sequence[str], mean, std):
    """Per-device function: uint8 (B, H, W, 3) images -> {output: float32 (B, ...)}."""
    outputs = tuple(outputs)
    if "logits" in outputs and model.num_classes == 0:
        raise ValueError("'logits' needs a classifier head; this model has num_classes=0")

    def forward(variables, images):
        x = normalize(images, mean, std)
        tokens = model.apply(variables, x, method="forward_features")
        out = {}
        if "tokens" in outputs:
            out["tokens"] = tokens.astype(jnp.float32)
        if "pooled" in outputs or "logits" in outputs:
            pooled = model.apply(variables, tokens, pre_logits=True, method="forward_head")
            if "pooled" in outputs:
                out["pooled"] = pooled.astype(jnp.float32)
            if "logits" in outputs:
                out["logits"] = model.apply(variables, pooled, method=_apply_head).astype(jnp.float32)
        return out

    return forward


def _apply_head(module, pooled):
    return module.head(pooled)


def output_row_floats(model, outputs: Sequence[str]) -> Dict[str, int]:
    """float32 values per row of each output (for part sizes)."""
    sizes = {"pooled": model.embed_dim, "logits": model.num_classes,
             "tokens": (model.num_patches + 1) * model.embed_dim}
    return {o: 4 * sizes[o] for o in outputs}


# ---- plan ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Unit:
    """A unit of work: `count` listed inputs starting at input index `start`, as slices
    (Listed, lo, hi) of what SRC listed (read when the unit runs), or one Streamed source (a tar
    shard), keyed while it is read."""
    index: int
    pieces: Tuple[Tuple[Listed, int, int], ...] = ()
    source: Optional[Streamed] = None
    start: int = 0
    count: int = 0


class Plan:
    """The inputs cut into units, and this process's contiguous block of them.

    Listed inputs are cut into units of `rows_per_unit`; each Streamed source is a unit. A unit
    holds slices of the listing, not its refs: a parquet table's rows are read only when their
    unit runs, so a plan of 100M table rows is a few thousand small objects. Row keys (the `id`
    column) are input indices when every input is listed up front (files, lists, tables); with
    streamed sources, whose samples are only known while reading, a row's key is
    (unit << 32) | position in the unit. Both sort in input order.
    """

    def __init__(self, inputs: Inputs, rows_per_unit: int, process_index: int = 0, process_count: int = 1):
        self.process_index, self.process_count = process_index, process_count
        segments: List[Any] = []
        for item in list(inputs.items) + list(inputs.problems):  # single refs grouped into RefLists
            if isinstance(item, ImageRef):
                if not segments or type(segments[-1]) is not RefList:
                    segments.append(RefList())
                segments[-1].append(item)
            else:
                segments.append(item)
        self.listed_only = not any(isinstance(i, Streamed) for i in segments)
        units: List[Unit] = []
        pieces: List[Tuple[Listed, int, int]] = []
        filled = position = 0

        def close():
            nonlocal pieces, filled
            if filled:
                units.append(Unit(len(units), tuple(pieces), start=position - filled, count=filled))
            pieces, filled = [], 0

        for seg in segments:
            if isinstance(seg, Streamed):
                close()
                units.append(Unit(len(units), source=seg, start=position))
                position += 1
                continue
            lo, n = 0, len(seg)
            while lo < n:
                take = min(n - lo, rows_per_unit - filled)
                pieces.append((seg, lo, lo + take))
                lo, filled, position = lo + take, filled + take, position + take
                if filled == rows_per_unit:
                    close()
        close()
        self.units = units
        self.num_inputs = position
        per, extra = divmod(len(units), process_count)
        lo = process_index * per + min(process_index, extra)
        self.mine = units[lo:lo + per + (process_index < extra)]
        self.fingerprint = _fingerprint(segments)

    def _key(self, unit: int, index: int, position: int) -> int:
        return index if self.listed_only else (unit << 32) | position

    def refs_of(self, unit: Unit) -> Iterator[ImageRef]:
        """The unit's inputs with their row keys; its table rows or streamed source are read here."""
        if unit.source is not None:
            return (dataclasses.replace(r, index=self._key(unit.index, 0, k))
                    for k, r in enumerate(unit.source.stream()))

        def listed():
            k = 0
            for seg, lo, hi in unit.pieces:
                for r in seg.refs(lo, hi):
                    yield dataclasses.replace(r, index=self._key(unit.index, unit.start + k, k))
                    k += 1
        return listed()

    def unit_of(self, key: int) -> int:
        if not self.listed_only:
            return key >> 32
        lo, hi = 0, len(self.units) - 1  # listed units are contiguous ranges of input indices
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.units[mid].start <= key:
                lo = mid
            else:
                hi = mid - 1
        return self.units[lo].index


def _fingerprint(segments) -> str:
    """The inputs' identity: each listed ref's and streamed source's id; a parquet table's file id
    (url, version, rows) and a folder's listing id (url, count, hash of its ids) stand for their rows."""
    h = hashlib.sha256()
    for seg in segments:
        for i in (seg if isinstance(seg, RefList) and seg.id is None else [seg]):
            h.update(i.id.encode("utf-8", "surrogateescape") + b"\0")
    return h.hexdigest()


# ---- manifest -----------------------------------------------------------------------------------
def weights_fingerprint(variables) -> str:
    h = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(variables)[0], key=lambda kv: str(kv[0])):
        a = np.asarray(leaf)
        h.update(str(path).encode() + str(a.dtype).encode() + str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


class Manifest:
    """manifest.json: the identity of a run (what must match to add rows to a folder) and its status."""

    # Fields that must match to add rows to an existing folder. Not the process or device count, nor
    # the global batch size (its default follows the device count): units are global and a row
    # does not depend on the batch it ran in, so a run may resume on another number of hosts/devices.
    IDENTITY_KEYS = ("format", "model", "weights_sha256", "outputs", "dtype", "storage_dtype", "img_size",
                     "data_config", "num_inputs", "inputs_sha256", "rows_per_unit", "rows_per_part", "columns",
                     "elastic", "decode")
    DEFAULTS = {"elastic": False, "decode": "exact"}  # for manifests written before the fields existed

    # What the user changes to change a field (for refusals; the CLI says the flags).
    CHANGED_BY = {"model": "`model`", "weights_sha256": "the weights (`checkpoint_path`)", "outputs": "`outputs`",
                  "dtype": "`dtype`", "storage_dtype": "`storage_dtype`", "img_size": "`img_size` / the model",
                  "data_config": "the model's data config", "num_inputs": "SRC", "inputs_sha256": "SRC",
                  "rows_per_unit": "`shard_size`", "rows_per_part": "`outputs`",
                  "columns": "SRC (table columns)", "format": "the beit-jax version",
                  "elastic": "`elastic`", "decode": "`decode`"}  # a folder is written by elastic workers, or by one plain run

    def __init__(self, folder: Folder, fields: Dict[str, Any]):
        self.folder, self.fields = folder, fields

    def open(self, resume: bool, lock: Optional[WriterLock] = None) -> None:
        """Take the writer lock (process 0), check the folder against this run (refusing another
        run's outputs, or a finished or unfinished run without `resume`), then mark it running.
        Every process checks the folder as it was before anyone wrote, and all refuse if one does."""
        try:
            if lock is not None:
                lock.acquire()
            self._check(resume)
            refusal = None
        except (OutputMismatchError, CorruptOutputError, OutputLockedError) as e:
            refusal = e
        if not par.all_processes_agree(np.array([refusal is None]))[0]:
            raise refusal or OutputMismatchError(f"another process refused {self.folder.url} (see its log)")
        par.sync("beit-jax-manifest-checked")
        if jax.process_index() == 0:
            self.folder.write(MANIFEST, json.dumps(dict(self.fields, status="running"), indent=2).encode())

    def _check(self, resume: bool) -> None:
        url = self.folder.url
        if not self.folder.exists(MANIFEST):
            if self.folder.listdir(UNITS):
                raise OutputMismatchError(f"{url} holds {UNITS}/ but no {MANIFEST}; use an empty folder")
            return
        existing = read_manifest(self.folder)
        self._refuse_another_run(existing)
        if not resume and existing.get("status") != "complete":
            raise OutputMismatchError(f"{url} holds an unfinished run of the same config: pass `resume=True` to "
                                      f"continue it, or use another `output_dir`")
        if not resume:
            markers = len([n for n in self.folder.listdir(UNITS) if n.endswith(".json")])
            if markers < int(existing.get("num_units", 0)):
                raise OutputMismatchError(
                    f"{url} holds a run marked complete, but {int(existing['num_units']) - markers} of its "
                    f"{existing['num_units']} unit markers are missing ({UNITS}/ was copied in part, or files were "
                    f"deleted): pass `resume=True` to redo those units, or use another `output_dir`")
            raise OutputMismatchError(f"{url} already holds a complete run; pass `resume=True` to reuse it "
                                      f"(nothing to do) or use another `output_dir`")

    def _refuse_another_run(self, existing: Dict[str, Any]) -> None:
        def get(fields, k):
            return fields.get(k, self.DEFAULTS.get(k))

        diffs = [k for k in self.IDENTITY_KEYS if get(existing, k) != get(self.fields, k)]
        if diffs:
            detail = "; ".join(f"{k} ({self.CHANGED_BY.get(k, k)}): folder has {get(existing, k)!r}, this run "
                               f"{get(self.fields, k)!r}" if k not in ("weights_sha256", "inputs_sha256")
                               else f"{k} ({self.CHANGED_BY[k]}) differs" for k in diffs)
            raise OutputMismatchError(
                f"{self.folder.url} holds outputs of a different run: {detail}. Use another `output_dir`; to "
                f"resume, rerun with the same {', '.join(dict.fromkeys(self.CHANGED_BY.get(k, k) for k in diffs))}.")

    def open_elastic(self) -> bool:
        """An elastic worker joins the run in this folder, creating its manifest if it is the first
        (create-if-absent: of workers starting together one creates it, the others check it).
        Another run's outputs are refused as by `open`. True if the run is already complete."""
        if not self.folder.exists(MANIFEST):
            if self.folder.listdir(UNITS):
                raise OutputMismatchError(f"{self.folder.url} holds {UNITS}/ but no {MANIFEST}; use an empty folder")
            if self.folder.create(MANIFEST, json.dumps(dict(self.fields, status="running"), indent=2).encode()):
                return False
        existing = read_manifest(self.folder)
        self._refuse_another_run(existing)
        return existing.get("status") == "complete"

    def finalize(self, num_units: int, retried: Sequence[int] = (), known: Optional[Dict[int, Dict]] = None
                 ) -> Dict[str, Any]:
        """Gather every unit's failures into failed.jsonl and mark the run complete: one listing,
        and a batch read of the markers not in `known` (those this process wrote or read on
        resume). `retried`: units of an elastic run that more than one worker claimed; part files
        of theirs that their marker does not list (a worker that lost the unit and died before
        removing them) go."""
        sizes = self.folder.sizes()
        done, problems = finished_units(self.folder, sizes, known=known)
        if len(done) != num_units or problems:
            raise CorruptOutputError(f"{self.folder.url}: {len(done)} of {num_units} units finished "
                                     f"({'; '.join(problems[:3]) or 'a process did not finish'}); rerun with `resume=True`")
        for unit in retried:
            kept = {f for p in done[unit]["parts"] for f in p["files"]}
            remove_unfinished_parts(self.folder, [unit], {r: n for r, n in sizes.items() if r not in kept})
        failed = [f for u in sorted(done) for f in done[u]["failed"]]
        rows = sum(m["rows"] for m in done.values())
        self.folder.write(FAILED, "".join(json.dumps(f) + "\n" for f in failed).encode())
        self.fields.update(status="complete", rows=rows, failed=len(failed))
        self.folder.write(MANIFEST, json.dumps(self.fields, indent=2).encode())
        return self.fields


# ---- the loop -----------------------------------------------------------------------------------
@dataclasses.dataclass
class LoopStats:
    decode_wait_s: float = 0.0
    device_wait_s: float = 0.0
    rows: int = 0
    failed: int = 0
    t_first: Optional[float] = None  # end of the first step (compile + warm-up)
    rows_first: int = 0


def lockstep(stream: Iterator[HostBatch], empty: Callable[[], HostBatch],
             stop: Optional[threading.Event] = None) -> Iterator[HostBatch]:
    """Batches until the stream ends or `stop` is set. With several processes they step together:
    a process whose inputs ran out feeds masked batches until every process is done (one program
    spans all devices), and a stop asked on any process stops all of them at the same step."""
    stop = stop or threading.Event()
    if jax.process_count() == 1:
        for hb in stream:
            if stop.is_set():
                return
            yield hb
        return
    mine = next(stream, None)
    while True:
        more, halt = par.any_process(mine is not None), par.any_process(stop.is_set())
        if halt or not more:
            return
        yield mine if mine is not None else empty()
        if mine is not None:
            mine = next(stream, None)


def run_pipeline(step: par.Step, dp: par.DataParallel, params, stream: Iterator[HostBatch],
                 on_rows: Callable[[int, HostBatch, Any], None]) -> LoopStats:
    """Feed every host batch of `stream` through `step`; hand (step index, batch, rows) to on_rows.

    The step of batch i is dispatched before batch i - 1 is read back, so the device works while
    the host fetches, writes and decodes.
    """
    stats = LoopStats()
    pending = None

    def finish(i: int, hb: HostBatch, out) -> None:
        t0 = time.perf_counter()
        rows = dp.fetch(out)
        stats.device_wait_s += time.perf_counter() - t0
        stats.rows += int(hb.valid.sum())
        stats.failed += len(hb.errors)
        on_rows(i, hb, rows)
        if i == 0:  # compile and warm-up end here: steady-state throughput counts from now
            stats.t_first, stats.rows_first = time.perf_counter(), stats.rows

    i = 0
    while True:
        t0 = time.perf_counter()
        hb = next(stream, None)
        stats.decode_wait_s += time.perf_counter() - t0
        if hb is None:
            break
        out = step(params, dp.put_batch(hb.images))  # async: the device works while we go on
        if pending is not None:
            finish(*pending)
        pending = (i, hb, out)
        i += 1
    if pending is not None:
        finish(*pending)
    return stats


class UnitTracker:
    """Routes each batch's rows to the sink and closes units in order, also those that yielded
    nothing (an empty tar)."""

    def __init__(self, plan: Plan, todo: Sequence[Unit], writer: Sink, outputs: Sequence[str]):
        self.plan, self.writer, self.outputs = plan, writer, outputs
        self.todo = [u.index for u in todo]  # in the order their rows come; an elastic worker appends as it claims
        self.next = 0  # position in todo of the first unit not closed yet

    @property
    def closed(self) -> int:
        return self.next

    def _close_until(self, unit: Optional[int]) -> None:
        """Close the units before `unit` in todo (None: all of them)."""
        while self.next < len(self.todo) and self.todo[self.next] != unit:
            self.writer.close(self.todo[self.next])
            self.next += 1

    def add(self, hb: HostBatch, rows: Dict[str, np.ndarray]) -> None:
        errors = dict(hb.errors)
        slots = [s for s, r in enumerate(hb.refs) if r is not None]
        for unit in dict.fromkeys(self.plan.unit_of(hb.refs[s].index) for s in slots):
            self._close_until(unit)
            mine = [s for s in slots if self.plan.unit_of(hb.refs[s].index) == unit]
            ok = [s for s in mine if hb.valid[s]]
            self.writer.add(unit, [hb.refs[s] for s in ok], {o: rows[o][ok] for o in self.outputs},
                            [(hb.refs[s], errors[hb.refs[s].index]) for s in mine if not hb.valid[s]])

    def finish(self) -> None:
        self._close_until(None)


# ---- extract ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ExtractConfig:
    """How `extract` runs (`beit-jax extract` makes a flag of each field: `--batch-size`, ...).

    `outputs`, `storage_dtype`, `shard_size`, `part_bytes` and `path_column` shape what is written
    (and so a run's identity, checked on resume); the rest is how fast it runs and what it prints.
    """
    outputs: Tuple[str, ...] = option(("pooled",), "comma list of pooled (B, D), tokens (B, 1+N, D), logits")
    batch_size: Optional[int] = option(None, "global batch over all devices of all hosts; a multiple of the "
                                             "device count (default: 256 per GPU/TPU device, 64 on CPU)",
                                       minimum=1)
    shard_size: int = option(4096, "listed inputs per unit of work and output file (a tar shard is one unit; "
                                   "files are also split to stay under 256 MB)", minimum=1)
    storage_dtype: str = option("float32", "dtype of the written arrays; float16 halves the files",
                                choices=STORAGE_DTYPES)
    part_bytes: int = option(256 << 20, "most bytes in one written file (and held in memory for it)", minimum=1,
                             cli=False)
    path_column: Optional[str] = option(None, "table sources: the column with image paths/URLs (default: the "
                                              "first of path, url, image_path, filepath); the other columns "
                                              "are copied to the metadata")
    parallel: str = option("sharded", "sharded: jax.jit over a device Mesh (all hosts); pmap: jax.pmap over "
                                      "local devices", choices=("sharded", "pmap"))
    workers: int = option(2, "decode workers per host; 0 decodes inline", minimum=0)
    backend: str = option("thread", "decode worker kind: threads (PIL releases the GIL) or spawned processes",
                          choices=("thread", "process"))
    decode: str = option("exact", "exact: timm's pixels, bit for bit; fast: a JPEG at least twice the resize "
                                  "size is decoded at 1/2-1/8 scale first (several times faster on large photos, "
                                  "features close to but not equal to exact; see README)", choices=DECODE_MODES)
    prefetch_shards: int = option(2, "tar shards streamed in ahead of the one being decoded", minimum=0, cli=False)
    resume: bool = option(False, "continue a killed run in the same folder: finished units are kept")
    elastic: bool = option(False, "one of any number of independent workers (started and stopped at any time, "
                                  "sharing only the output folder; no --distributed): each claims units with a "
                                  "lease, takes over expired ones, and exits 0 when every unit is finished")
    lease_seconds: float = option(120.0, "elastic: a claim not renewed for this long is taken over by another "
                                         "worker (renewed every quarter of it)")
    verify: bool = option(False, "when resuming: check the sha256 of every finished file, not just its size")
    progress: bool = option(True, "show a progress bar", flag="--no-progress")

    def __post_init__(self):
        if isinstance(self.lease_seconds, bool) or not isinstance(self.lease_seconds, (int, float)) or not (
                self.lease_seconds > 0):
            raise ValueError(f"lease_seconds must be a positive number (got {self.lease_seconds!r})")
        outputs = tuple(dict.fromkeys([self.outputs] if isinstance(self.outputs, str) else self.outputs))
        object.__setattr__(self, "outputs", outputs)
        bad = [o for o in outputs if o not in OUTPUTS]
        if bad or not outputs:
            raise ValueError(f"outputs must be among {OUTPUTS} (got {list(outputs)})")
        for f in dataclasses.fields(self):
            value, least, choices = getattr(self, f.name), f.metadata["minimum"], f.metadata["choices"]
            if least is not None and not (value is None and f.default is None) and (
                    not isinstance(value, int) or isinstance(value, bool) or value < least):
                raise ValueError(f"{f.name} must be {'a positive integer' if least == 1 else f'{least} or more'} "
                                 f"(got {value!r})")
            if choices and value not in choices:
                raise ValueError(f"{f.name} must be one of {', '.join(choices)} (got {value!r})")


@dataclasses.dataclass
class _Job:
    """One process's share of a run, set up by `extract` and carried out by `_run`."""
    cfg: ExtractConfig
    manifest: "Manifest"
    folder: Folder
    plan: Plan
    dp: Any
    step: Any
    writer: FeatureWriter
    model: Any
    variables: Any
    transform: Any
    local_batch: int
    stop: threading.Event
    t_start: float
    hint: Optional[str]
    inputs: Inputs


def extract(src, output_dir: str, model, variables, config: Optional[ExtractConfig] = None, *,
            model_name: Optional[str] = None, storage_options: Optional[Dict[str, Any]] = None,
            data_config: Optional[Dict[str, Any]] = None, stop: Optional[threading.Event] = None,
            **settings) -> Dict[str, Any]:
    """Run `model` over every image of `src` and write features to `output_dir`. Returns a summary.

    src / output_dir: local paths or fsspec URLs (storage_options for credentials/endpoints); src
    may also be `sources.list_inputs(...)`'s result. How it runs is an `ExtractConfig` (`config`,
    and/or its fields as keywords: `extract(src, out, model, variables, batch_size=64,
    outputs=("pooled", "tokens"))`); see its fields. batch_size is global (all devices of all
    processes; default `parallel.inference_defaults`: 256 per GPU/TPU device, 64 on CPU; the
    summary's `hint` says when it is too small). The model micro-batches on CPU by itself
    (`Beit.micro_batch`). Unreadable inputs are recorded in failed.jsonl and skipped; the run
    succeeds unless every input failed (AllInputsFailedError). One writer per output folder (a lock).
    stop: when set (the CLI sets it on Ctrl-C / SIGTERM), the run ends after the current batch with
    its finished units kept; the summary then says interrupted=True. The summary names the compute
    dtype and the attention implementation that ran.
    """
    t_start = time.perf_counter()
    cfg = dataclasses.replace(config or ExtractConfig(), **settings)
    defaults = par.inference_defaults(batch_size=cfg.batch_size)
    cfg = dataclasses.replace(cfg, batch_size=defaults.batch_size)
    data_cfg = data_config or resolve_data_config(model)
    transform = create_transform(**data_cfg)
    folder = Folder(output_dir, storage_options)
    folder.check_writable()
    inputs = src if isinstance(src, Inputs) else list_inputs(src, storage_options, cfg.path_column, folder)
    if not inputs.items and not inputs.problems:
        raise ValueError(f"no images found in {inputs.src} (looked for "
                         f"{', '.join(sorted(e.lstrip('.') for e in IMAGE_EXTENSIONS))} files, lists, tables, tar shards)")
    dp = par.DataParallel(cfg.parallel)
    if cfg.elastic and dp.process_count > 1:
        raise ValueError("`elastic` workers run independently, each on its own devices: start them without "
                         "`jax.distributed` (--distributed); lockstep multi-host runs are the plain mode")
    if cfg.elastic and cfg.resume:
        raise ValueError("`elastic` workers always continue the run in `output_dir`: drop `resume`")
    local_batch = dp.local_batch_size(cfg.batch_size)
    step = dp.inference_step(make_forward(model, cfg.outputs, data_cfg["mean"], data_cfg["std"]))
    plan = Plan(inputs, cfg.shard_size, dp.process_index, dp.process_count)
    if not plan.units:  # tables (or lists) without a single row
        raise ValueError(f"no images found in {inputs.src}: its {len(inputs.items)} tables and lists hold no rows")
    leases = Leases(folder, cfg.lease_seconds, UNITS) if cfg.elastic else None
    writer = FeatureWriter(folder, cfg.outputs, output_row_floats(model, cfg.outputs), inputs.columns,
                           cfg.storage_dtype, cfg.part_bytes, process=dp.process_index,
                           column_types=inputs.column_types, claims=leases)

    folder.makedirs()
    manifest = Manifest(folder, {
        "format": FORMAT,
        # canonical arch.tag, so CLI ('beit_base_patch16_224') and API runs of one model agree
        "model": model.pretrained_cfg.name if model.pretrained_cfg else (model_name or type(model).__name__),
        "weights_sha256": weights_fingerprint(variables),
        "outputs": list(cfg.outputs),
        "dtype": jnp.dtype(model.dtype).name,
        "storage_dtype": cfg.storage_dtype,
        "img_size": model.img_size,
        "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in data_cfg.items()},
        "num_inputs": plan.num_inputs,
        "inputs_sha256": plan.fingerprint,
        "global_batch_size": cfg.batch_size,
        "rows_per_unit": cfg.shard_size,
        "rows_per_part": writer.rows_per_part,
        "columns": inputs.columns,
        "num_units": len(plan.units),
        "row_keys": "input index" if plan.listed_only else "(unit << 32) | position in unit",
        "parallel": cfg.parallel,
        "process_count": dp.process_count,
        "elastic": cfg.elastic,
        "decode": cfg.decode,
    })
    job = _Job(cfg, manifest, folder, plan, dp, step, writer, model, variables, transform, local_batch,
               stop or threading.Event(), t_start, defaults.hint, inputs)
    if leases is not None:
        return _run_elastic(job, leases, already_complete=manifest.open_elastic())
    lock = WriterLock(folder) if dp.process_index == 0 else None
    try:
        manifest.open(cfg.resume, lock)
        return _run(job)
    finally:
        if lock is not None:
            lock.release()


def _run(job: _Job) -> Dict[str, Any]:
    cfg, folder, plan, dp, writer, stop = job.cfg, job.folder, job.plan, job.dp, job.writer, job.stop
    if dp.process_index == 0:
        _remove_own_temp_files(folder)
        job.inputs.save_listings(folder)  # resumes read it instead of walking SRC's folders again
    par.sync("beit-jax-manifest")

    sizes = folder.sizes() if cfg.resume else {}
    done, problems = finished_units(folder, sizes, verify=cfg.verify) if cfg.resume else ({}, [])
    for p in problems:
        print(f"warning: redoing {p}", file=sys.stderr, flush=True)
    is_done = par.all_processes_agree(np.array([u.index in done for u in plan.units], dtype=bool))
    todo = [u for u in plan.mine if not is_done[u.index]]
    if cfg.resume:  # parts a killed run left of the units this process redoes: gone before the redo
        remove_unfinished_parts(folder, [u.index for u in todo], sizes)

    bar = None
    if cfg.progress and dp.process_index == 0:
        from tqdm.auto import tqdm
        total = sum(u.count for u in todo) if plan.listed_only else None
        bar = tqdm(total=total, unit="img", desc=f"extract ({dp.num_devices} devices, {cfg.parallel})",
                   dynamic_ncols=True, file=sys.stderr)

    tracker = UnitTracker(plan, todo, writer, cfg.outputs)

    def on_rows(i: int, hb: HostBatch, rows) -> None:
        tracker.add(hb, rows)
        if bar is not None:
            bar.update(int((hb.indices >= 0).sum()))

    image_shape = (job.transform.size[0], job.transform.size[1], 3)
    params = dp.replicate(cast_for_inference(job.model, job.variables))
    refs = prefetch([lambda u=u: plan.refs_of(u) for u in todo], ahead=cfg.prefetch_shards)
    try:
        with Decoder(job.transform, workers=cfg.workers, backend=cfg.backend,
                     window=max(2 * job.local_batch, 16), decode=cfg.decode) as decoder:
            stream = lockstep(stream_batches(refs, job.local_batch, decoder, image_shape),
                              lambda: HostBatch.empty(job.local_batch, image_shape), stop)
            stats = run_pipeline(job.step, dp, params, stream, on_rows)
        if not stop.is_set():
            tracker.finish()
    except StorageFullError as e:
        raise StorageFullError(e.errno, f"{e.strerror}. {tracker.closed} of this process's {len(todo)} units "
                               f"were finished and are kept: free space, then run the same command with "
                               f"`resume=True` to continue") from e
    finally:
        refs.close()
        if bar is not None:
            bar.close()
    interrupted = stop.is_set()
    if not interrupted:
        par.sync("beit-jax-extract-done")
        if dp.process_index == 0:
            job.manifest.finalize(len(plan.units), known={**done, **writer.written})
        par.sync("beit-jax-finalized")
        _refuse_empty(folder, plan)
    return _summary(job, stats, skipped_units=int(is_done.sum()), redone_units=len(problems), interrupted=interrupted,
                    finished_units=int(is_done.sum()) + tracker.closed)


def _refuse_empty(folder: Folder, plan: Plan) -> None:
    """A complete run without a single feature is an error, not rc 0."""
    totals = read_manifest(folder)
    if totals["rows"] == 0 and totals["failed"] > 0:
        first = json.loads(folder.read(FAILED).decode().splitlines()[0])
        raise AllInputsFailedError(
            f"every one of the {totals['failed']} inputs failed, so {folder.url} holds no features (see "
            f"{folder.url_of(FAILED)}; the first: {first['path']}: {first['error']})")
    if totals["rows"] == 0 and totals["failed"] == 0:  # only tar shards, and they held no samples
        raise AllInputsFailedError(f"no images found: the {len(plan.units)} tar shards of SRC hold no samples, "
                                   f"so {folder.url} holds no features")


def _summary(job: _Job, stats: LoopStats, **counts) -> Dict[str, Any]:
    t_end = time.perf_counter()
    elapsed = t_end - job.t_start
    steady_s = t_end - (stats.t_first or t_end)
    dp = job.dp
    return dict(images=stats.rows, failed=stats.failed, seconds=elapsed,
                images_per_sec=stats.rows / elapsed if elapsed > 0 else 0.0,
                steady_images_per_sec=(stats.rows - stats.rows_first) / steady_s if steady_s > 0 else None,
                decode_wait_s=stats.decode_wait_s, device_wait_s=stats.device_wait_s, write_s=job.writer.write_s,
                units=len(job.plan.units), devices=dp.num_devices, processes=dp.process_count,
                compiled_programs=job.step.traces, batch_size=job.local_batch * dp.process_count, hint=job.hint,
                **counts, **_compute_summary(job.model))


def _run_elastic(job: _Job, leases: Leases, already_complete: bool) -> Dict[str, Any]:
    """One elastic worker (see elastic.py): rounds of claim -> extract -> close, until every unit
    of the run is finished by someone; then finalise if no one has."""
    cfg, folder, plan, dp, writer, stop = job.cfg, job.folder, job.plan, job.dp, job.writer, job.stop
    units = [u.index for u in plan.units]
    stats = LoopStats()
    view = leases.scan()
    skipped = len(view.finished)
    if already_complete:
        return _summary(job, stats, skipped_units=skipped, redone_units=0, interrupted=False,
                        finished_units=skipped, elastic=True, claimed_units=0, lost_units=0)
    job.inputs.save_listings(folder)
    max_poll_s, poll_s = min(5.0, leases.lease_s / 4), 0.25  # waiting on others: quick at first, then backing off
    image_shape = (job.transform.size[0], job.transform.size[1], 3)
    params = dp.replicate(cast_for_inference(job.model, job.variables))
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(units), initial=skipped, unit="unit", dynamic_ncols=True, file=sys.stderr,
                   desc=f"extract --elastic ({dp.num_devices} devices)")
    claimed = 0
    leases.start()
    try:
        with Decoder(job.transform, workers=cfg.workers, backend=cfg.backend,
                     window=max(2 * job.local_batch, 16), decode=cfg.decode) as decoder:
            while not stop.is_set():
                if all(u in view.finished for u in units):
                    break
                tracker = UnitTracker(plan, [], writer, cfg.outputs)
                mine = claimed_units(leases, view, units, tracker.todo.append)
                refs = prefetch((lambda u=u: plan.refs_of(plan.units[u]) for u in mine),
                                ahead=max(1, cfg.prefetch_shards))
                try:
                    stream = lockstep(stream_batches(refs, job.local_batch, decoder, image_shape),
                                      lambda: HostBatch.empty(job.local_batch, image_shape), stop)
                    _add_stats(stats, run_pipeline(job.step, dp, params, stream, lambda i, hb, rows: tracker.add(hb, rows)))
                    if not stop.is_set():
                        tracker.finish()
                finally:
                    refs.close()
                claimed += len(tracker.todo)
                if not tracker.todo:  # every unit left is held by a live worker: wait for it to finish or lapse
                    stop.wait(poll_s)
                    poll_s = min(2 * poll_s, max_poll_s)
                else:
                    poll_s = 0.25
                view = leases.scan()
                if bar is not None:
                    bar.n = len(view.finished)
                    bar.refresh()
    finally:
        leases.stop()
        if stop.is_set():
            released = leases.release_all()
            if released:
                print(f"stopping: released {len(released)} unfinished units to the other workers", file=sys.stderr,
                      flush=True)
        if bar is not None:
            bar.close()
    interrupted = stop.is_set()
    if not interrupted:
        if read_manifest(folder).get("status") != "complete":
            job.manifest.finalize(len(units), retried=[u for u, n in view.attempts.items() if n > 1],
                                  known=writer.written)
            _remove_own_temp_files(folder)  # of killed workers: every unit is finished, nothing is being written
        _refuse_empty(folder, plan)
    return _summary(job, stats, skipped_units=skipped, redone_units=0, interrupted=interrupted,
                    finished_units=len(view.finished), elastic=True, claimed_units=claimed,
                    lost_units=len(writer.lost_units))


def _add_stats(total: LoopStats, one: LoopStats) -> None:
    if total.t_first is None and one.t_first is not None:
        total.t_first, total.rows_first = one.t_first, total.rows + one.rows_first
    total.decode_wait_s += one.decode_wait_s
    total.device_wait_s += one.device_wait_s
    total.rows += one.rows
    total.failed += one.failed


def _compute_summary(model) -> Dict[str, Any]:
    """Compute dtype and the attention implementation that ran (and why not cuDNN, if it did not)."""
    impl, why = model.attention_impl()
    return dict(dtype=jnp.dtype(model.dtype).name, attention=impl, attention_note=why)


def _remove_own_temp_files(folder: Folder) -> None:
    """Leftovers of a killed local writer: only files named with our temp marker, in our folders."""
    if not folder.local:
        return
    import os

    for sub in [""] + [d for d in folder.listdir() if os.path.isdir(folder.path(d))]:
        for name in folder.listdir(sub):
            if TEMP_MARKER in name:
                try:
                    os.remove(folder.path(os.path.join(sub, name) if sub else name))
                except FileNotFoundError:
                    pass


__all__ = ["extract", "ExtractConfig", "read_features", "iter_features", "read_failures", "OutputMismatchError", "CorruptOutputError", "Plan",
           "Manifest", "make_forward", "run_pipeline", "OUTPUTS"]
