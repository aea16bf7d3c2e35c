"""What `extract` writes, in the layout the vector-search tools read (clip-retrieval's):

  OUT/<output>/<stem>.npy         one per output (pooled, logits: 2-D (rows, D); tokens: 3-D)
  OUT/metadata/<stem>.parquet     same stem and row order: id, path, passed-through table columns
  OUT/units/<unit>.json           written last for each unit of work: its parts (rows, bytes,
                                  sha256 of every file) and its failed inputs. A unit without it
                                  is unfinished and is redone by a resume.
  OUT/manifest.json, OUT/failed.jsonl   (extract.py)

Stems are '<unit:07d>-<part:04d>' and sort in input order. A unit's rows are split into parts of at
most `part_bytes`, so memory stays bounded for any output (tokens of a large model included).
`embedding_reader.EmbeddingReader(OUT/'pooled', metadata_folder=OUT/'metadata',
meta_columns=['path'], file_format='parquet_npy')` reads it as is.
"""
from __future__ import annotations

import hashlib
import io
import json
import time
import warnings
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .sources import ImageRef
from .storage import Folder

MANIFEST = "manifest.json"
FAILED = "failed.jsonl"
UNITS = "units"
METADATA = "metadata"
OUTPUTS = ("pooled", "tokens", "logits")  # what a run can write, each a sub-folder of parts
PART_FOLDERS = OUTPUTS + (METADATA,)
STORAGE_DTYPES = ("float32", "float16")


class OutputMismatchError(RuntimeError):
    """The output folder holds results of another model, config or input list."""


class CorruptOutputError(RuntimeError):
    """A finished file is missing, truncated or altered; the message names it."""


def stem(unit: int, part: int, attempt: int = 0) -> str:
    """'<unit>-<part>'; an elastic run's takeover attempt k > 0 of a unit adds '-<k>', so two workers
    never write the same file."""
    return f"{unit:07d}-{part:04d}" + (f"-{attempt}" if attempt else "")


def unit_marker(unit: int) -> str:
    return f"{UNITS}/{unit:07d}.json"


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def parquet_bytes(columns: Dict[str, list], types: Optional[Dict[str, Any]] = None) -> bytes:
    """A parquet file of `columns`; `types` (column -> pyarrow type) fixes their schema, so every
    part of a run has the same one (a part whose values are all None is not typed null)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    types = types or {}
    schema = pa.schema([(c, types[c]) if c in types else (c, pa.array(v).type) for c, v in columns.items()])
    pq.write_table(pa.table(columns, schema=schema), buf)
    return buf.getvalue()


class Sink:
    """Where extraction's rows go: the contract `extract.UnitTracker` relies on.

    One process's units arrive in increasing order; `add` hands over the valid rows and the failed
    inputs of (part of) one batch for one unit, `close` ends a unit, also one that produced no
    rows. A unit is finished, for resumes and readers, exactly when `close` has returned: a sink
    writes each unit's completion record last, whole (see FeatureWriter's marker). `write_s`: time
    spent writing, for the run's summary.
    """
    write_s: float = 0.0

    def add(self, unit: int, refs: Sequence[ImageRef], rows: Dict[str, np.ndarray],
            failed: Sequence[Tuple[ImageRef, str]] = ()) -> None:
        raise NotImplementedError

    def close(self, unit: int) -> Dict[str, Any]:
        raise NotImplementedError


class FeatureWriter(Sink):
    """The Sink of the layout above: rows of one process's units -> npy + parquet parts, then the
    unit's marker.

    Units arrive in order; `add` takes the valid rows and the failures of one batch, `close` ends a
    unit (also one that produced no rows). Parts are flushed as soon as they hold `rows_per_part`.
    """

    def __init__(self, folder: Folder, outputs: Sequence[str], row_bytes: Dict[str, int], columns: Sequence[str],
                 storage_dtype: str = "float32", part_bytes: int = 256 << 20, process: int = 0,
                 column_types: Optional[Dict[str, Any]] = None, claims=None):
        if storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"storage dtype must be one of {STORAGE_DTYPES} (got {storage_dtype!r})")
        self.folder, self.outputs, self.columns, self.process = folder, tuple(outputs), list(columns), process
        # elastic runs: `claims` (elastic.Leases) gives each unit's attempt, and markers are created
        # create-if-absent, so of two workers that did one unit exactly one wins
        self.claims = claims
        self.lost_units: List[int] = []
        self.written: Dict[int, Dict[str, Any]] = {}  # unit -> the marker this writer wrote (for finalize)
        import pyarrow as pa

        self.types = {"id": pa.int64(), "path": pa.string(), **(column_types or {})}
        self.dtype = np.dtype(storage_dtype)
        per_row = sum(row_bytes[o] for o in self.outputs) * self.dtype.itemsize // 4
        self.rows_per_part = max(1, part_bytes // max(per_row, 1))
        self.write_s = 0.0
        self._unit: Optional[int] = None
        self._rows: Dict[str, list] = {}
        self._refs: List[ImageRef] = []
        self._parts: List[Dict[str, Any]] = []
        self._failed: List[Dict[str, str]] = []

    def _start(self, unit: int) -> None:
        self._unit, self._parts, self._failed = unit, [], []
        self._rows, self._refs = {o: [] for o in self.outputs}, []

    def add(self, unit: int, refs: Sequence[ImageRef], rows: Dict[str, np.ndarray],
            failed: Sequence[Tuple[ImageRef, str]] = ()) -> None:
        if self._unit != unit:
            if self._unit is not None:
                raise RuntimeError(f"unit {self._unit} was not closed before unit {unit}")
            self._start(unit)
        self._failed.extend({"path": r.id, "error": e} for r, e in failed)
        for i, ref in enumerate(refs):
            self._refs.append(ref)
            for o in self.outputs:
                self._rows[o].append(rows[o][i])
            if len(self._refs) == self.rows_per_part:
                self._flush()

    def close(self, unit: int) -> Dict[str, Any]:
        """Write what is left of the unit and its marker (the unit is then finished)."""
        if self._unit != unit:
            self._start(unit)
        if self._refs:
            self._flush()
        t0 = time.perf_counter()
        marker = {"unit": unit, "process": self.process, "rows": sum(p["rows"] for p in self._parts),
                  "parts": self._parts, "failed": self._failed}
        if self.claims is None:
            self.folder.write(unit_marker(unit), json.dumps(marker).encode())
        else:
            marker.update(attempt=self.claims.attempt(unit), worker=self.claims.worker)
            if self.claims.is_lost(unit) or not self.folder.create(unit_marker(unit), json.dumps(marker).encode()):
                for p in self._parts:  # another worker finished it first: what we wrote is never read
                    for rel in p["files"]:
                        self.folder.remove(rel)
                self.lost_units.append(unit)
                marker = None
            self.claims.done(unit)
        if marker is not None:
            self.written[unit] = marker
        self.write_s += time.perf_counter() - t0
        self._unit = None
        return marker

    def _flush(self) -> None:
        t0 = time.perf_counter()
        s = stem(self._unit, len(self._parts), self.claims.attempt(self._unit) if self.claims else 0)
        files = {}
        for o in self.outputs:
            files[f"{o}/{s}.npy"] = npy_bytes(np.stack(self._rows[o]).astype(self.dtype))
        meta = {"id": [r.index for r in self._refs], "path": [r.id for r in self._refs]}
        for c in self.columns:
            meta[c] = [(r.meta or {}).get(c) for r in self._refs]
        files[f"{METADATA}/{s}.parquet"] = parquet_bytes(meta, self.types)
        for rel, data in files.items():
            self.folder.write(rel, data)
        self._parts.append({"stem": s, "rows": len(self._refs),
                            "files": {rel: {"bytes": len(d), "sha256": hashlib.sha256(d).hexdigest()}
                                      for rel, d in files.items()}})
        self._rows, self._refs = {o: [] for o in self.outputs}, []
        self.write_s += time.perf_counter() - t0


# ---- reading back ---------------------------------------------------------------------------------
def read_manifest(folder: Folder) -> Dict[str, Any]:
    if not folder.exists(MANIFEST):
        raise FileNotFoundError(f"{folder.url_of(MANIFEST)} not found: not a beit-jax extract output")
    raw = folder.read(MANIFEST)
    try:
        return json.loads(raw)
    except ValueError as e:
        raise CorruptOutputError(f"{folder.url_of(MANIFEST)} is not valid JSON ({len(raw)} bytes: {e}); "
                                 f"the folder was damaged: extract into a new folder") from e


def finished_units(folder: Folder, sizes: Optional[Dict[str, int]] = None, verify: bool = False,
                   known: Optional[Dict[int, Dict]] = None) -> Tuple[Dict[int, Dict], List[str]]:
    """({unit: marker} of finished units whose files are all present at their recorded size (and,
    with verify, sha256), [problems]): a unit with a missing or damaged file is reported and left
    out (to be redone). One listing of the folder; the markers are read in one batch of concurrent
    requests, except those in `known` (markers this process wrote or read already, by unit)."""
    sizes = folder.sizes() if sizes is None else sizes
    done, problems, known = {}, [], known or {}
    rels = sorted(r for r in sizes if r.startswith(UNITS + "/") and r.endswith(".json"))
    unit_of = {rel: _unit_of_marker(rel) for rel in rels}
    raw = folder.read_many([rel for rel in rels if unit_of[rel] not in known])
    for rel in rels:
        try:
            if unit_of[rel] in known:
                marker = known[unit_of[rel]]
            elif isinstance(raw[rel], Exception):
                raise raw[rel]
            else:
                marker = json.loads(raw[rel])
        except FileNotFoundError:
            problems.append(f"{folder.url_of(rel)} vanished while being read")
            continue
        except ValueError:
            problems.append(f"{folder.url_of(rel)} is not valid JSON")
            continue
        bad = [f"{folder.url_of(f)} ({'missing' if f not in sizes else f'{sizes[f]} bytes'}, expected {info['bytes']})"
               for p in marker["parts"] for f, info in p["files"].items() if sizes.get(f) != info["bytes"]]
        if not bad and verify:
            for p in marker["parts"]:
                for f, info in p["files"].items():
                    try:
                        _verified(folder, f, info)
                    except CorruptOutputError:
                        bad.append(f"{folder.url_of(f)} (sha256 differs from the one recorded)")
        if bad:
            problems.append(f"unit {marker['unit']}: " + "; ".join(bad))
            continue
        done[int(marker["unit"])] = marker
    return done, problems


def _unit_of_marker(rel: str) -> Optional[int]:
    try:
        return int(rel.rsplit("/", 1)[1][:-5])
    except ValueError:
        return None


def remove_unfinished_parts(folder: Folder, units: Sequence[int], sizes: Dict[str, int]) -> List[str]:
    """Remove the part files (npy and metadata parquet) of `units`, which are about to be redone:
    a run killed before a unit's marker leaves parts that the redo may not rewrite (its inputs
    changed, it needs fewer parts), and embedding-reader / autofaiss read every file in the folder.
    Only files named as this writer names parts (<unit>-<part>.npy / .parquet) in its own
    sub-folders are touched. Returns what was removed."""
    prefixes = {f"{u:07d}-" for u in units}
    stale = [rel for rel in sorted(sizes) if "/" in rel and rel.split("/", 1)[0] in PART_FOLDERS
             and rel.split("/", 1)[1][:8] in prefixes and rel.endswith((".npy", ".parquet"))]
    for rel in stale:
        folder.remove(rel)
    return stale


def _verified(folder: Folder, rel: str, info: Dict[str, Any]) -> bytes:
    data = folder.read(rel)
    if len(data) != info["bytes"] or hashlib.sha256(data).hexdigest() != info["sha256"]:
        raise CorruptOutputError(f"{folder.url_of(rel)} does not match what was written ({len(data)} bytes, "
                                 f"expected {info['bytes']}, or its sha256 differs): run the same extract "
                                 f"command with `resume=True, verify=True`, which redoes the damaged units")
    return data


def _finished_run(output_dir: str, output: Optional[str], storage_options, allow_partial: bool):
    """(folder, output, {unit: marker}) of a run whose finished units may be read, else
    CorruptOutputError (or, with allow_partial, a warning and the finished units only)."""
    folder = Folder(output_dir, storage_options)
    manifest = read_manifest(folder)
    output = output or manifest["outputs"][0]
    if output not in manifest["outputs"]:
        raise ValueError(f"{output_dir} has outputs {manifest['outputs']}, not {output!r}")
    done, problems = finished_units(folder)
    if manifest.get("status") == "complete":  # every unit finished: each marker must be there
        missing = [u for u in range(int(manifest.get("num_units", 0))) if u not in done]
        if missing:
            problems.append(f"the manifest says complete but {len(missing)} unit marker"
                            f"{'s are' if len(missing) > 1 else ' is'} missing "
                            f"({', '.join(folder.url_of(unit_marker(u)) for u in missing[:3])}"
                            f"{', ...' if len(missing) > 3 else ''}): a partial copy, or deleted files")
        elif "rows" in manifest and sum(m["rows"] for m in done.values()) != manifest["rows"]:
            problems.append(f"the units hold {sum(m['rows'] for m in done.values())} rows, the manifest "
                            f"{manifest['rows']}")
    if manifest.get("status") != "complete" or problems:
        msg = (f"{output_dir} is unfinished ({len(done)} of {manifest.get('num_units', '?')} units done"
               f"{'; ' + '; '.join(problems[:5]) if problems else ''})")
        if not allow_partial:
            raise CorruptOutputError(msg + ": finish it with extract(..., resume=True) (beit-jax extract --resume), or pass "
                                           "allow_partial=True to read the finished units")
        warnings.warn(msg + ": returning the finished units only", stacklevel=3)
    return folder, output, done


def _parts(folder: Folder, output: str, done: Dict[int, Dict[str, Any]], output_dir: str):
    """(ids, paths, features) of every part of the finished units, in input order, one part in
    memory at a time, each file checked against its recorded size and sha256."""
    import pyarrow.parquet as pq

    last = -1
    for unit in sorted(done):
        for part in done[unit]["parts"]:
            files = part["files"]
            arr_rel, meta_rel = f"{output}/{part['stem']}.npy", f"{METADATA}/{part['stem']}.parquet"
            feats = np.load(io.BytesIO(_verified(folder, arr_rel, files[arr_rel])))
            # one part's two columns: no Arrow thread pool (started beside gcsfs's gRPC, its threads
            # could abort the interpreter at exit: "terminate called without an active exception")
            table = pq.read_table(io.BytesIO(_verified(folder, meta_rel, files[meta_rel])), columns=["id", "path"],
                                  use_threads=False)
            ids = np.asarray(table.column("id").to_pylist(), np.int64)
            if len(ids) != len(feats):
                raise CorruptOutputError(f"{folder.url_of(meta_rel)} has {len(ids)} rows, {folder.url_of(arr_rel)} "
                                         f"{len(feats)}")
            # a unit's rows are written in key order and units follow input order: anything else
            # is a folder mixing runs
            if len(ids) and (ids[0] <= last or np.any(np.diff(ids) <= 0)):
                raise CorruptOutputError(f"{output_dir}: rows out of input order or repeated in "
                                         f"{folder.url_of(meta_rel)} (mixed runs?)")
            last = int(ids[-1]) if len(ids) else last
            yield ids, table.column("path").to_pylist(), feats


def iter_features(output_dir: str, output: Optional[str] = None, *, batch_rows: int = 65536,
                  storage_options=None, allow_partial: bool = False) -> Iterator[Tuple[np.ndarray, List[str], np.ndarray]]:
    """(ids, paths, features) of an extract run in chunks of `batch_rows` rows (the last one
    shorter), in input order, holding at most one written part plus one chunk in memory: for
    outputs larger than memory. The same checks as read_features: the run is refused before the
    first chunk if unfinished (allow_partial: warn and read the finished units), every file is
    checked against its size and sha256 as it is read (CorruptOutputError naming it).
    """
    if not isinstance(batch_rows, int) or isinstance(batch_rows, bool) or batch_rows < 1:
        raise ValueError(f"batch_rows must be a positive integer (got {batch_rows!r})")
    folder, output, done = _finished_run(output_dir, output, storage_options, allow_partial)
    return _chunks(_parts(folder, output, done, output_dir), batch_rows)


def _chunks(parts, batch_rows: int):
    ids, paths, feats, held = [], [], [], 0
    for i, p, f in parts:
        ids.append(i)
        paths.extend(p)
        feats.append(f)
        held += len(i)
        while held >= batch_rows:
            all_ids, all_feats = np.concatenate(ids), np.concatenate(feats)
            yield all_ids[:batch_rows], paths[:batch_rows], all_feats[:batch_rows]
            ids, paths, feats = [all_ids[batch_rows:]], paths[batch_rows:], [all_feats[batch_rows:]]
            held -= batch_rows
    if held:
        yield np.concatenate(ids), paths, np.concatenate(feats)


def read_features(output_dir: str, output: Optional[str] = None, *, storage_options=None,
                  allow_partial: bool = False, with_ids: bool = False):
    """(paths, features) of an extract run, in input order (failed inputs have no row).

    output: 'pooled', 'tokens' or 'logits' (default: the run's first). Every file is checked
    against the size and sha256 recorded when it was written. An unfinished run raises unless
    allow_partial=True, which warns and returns the finished units only. with_ids adds the id
    column as a third value. For outputs larger than memory: iter_features.
    """
    folder, output, done = _finished_run(output_dir, output, storage_options, allow_partial)
    ids, paths, feats = [], [], []
    for i, p, f in _parts(folder, output, done, output_dir):
        ids.append(i)
        paths.extend(p)
        feats.append(f)
    if not ids:
        empty = np.zeros((0,), np.float32)
        return ([], empty, np.zeros((0,), np.int64)) if with_ids else ([], empty)
    ids, feats = np.concatenate(ids), np.concatenate(feats)
    return (paths, feats, ids) if with_ids else (paths, feats)


def read_failures(output_dir: str, storage_options=None) -> List[Dict[str, str]]:
    folder = Folder(output_dir, storage_options)
    if not folder.exists(FAILED):
        return []
    return [json.loads(line) for line in folder.read(FAILED).decode().splitlines() if line.strip()]
