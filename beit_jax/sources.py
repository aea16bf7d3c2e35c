"""Image sources: what SRC names, as a deterministic list of inputs, whatever storage it is on.

SRC (one or several, any local path or fsspec URL; see storage.py):
  folder / bucket prefix   every image below it, recursively, sorted (local walks detect symlink
                           loops and report unreadable sub-folders); a folder holding no images is
                           read as its tar shards (tables beside them are their metadata and are
                           skipped), or else as its tables, sorted; skipped files are warned about
  glob                     'imgs/*.jpg', 's3://b/shards/*.tar' (sorted); webdataset's brace syntax
                           'shards/shard-{00000..00999}.tar' is expanded first
  list file (.txt .lst)    one path/URL per line, relative to the list's folder; '#' comments
  table (.parquet .csv     a path/URL column (path_column, default the first of path, url,
         .jsonl)           image_path, filepath present); the other columns travel to the outputs
  tar shard (.tar)         a webdataset shard: members grouped into samples by key, the image member
                           taken by extension, id '<shard>/<key>'; read as one sequential stream
  image file               itself

Listed inputs are known up front: files, list lines and csv/jsonl rows become `ImageRef`s at once
(a `RefList`); a parquet table is a `TableFile`, listed from its footer (row count and schema) and
read a row group at a time when a unit needs its rows, so start-up and memory do not grow with its
rows. A folder's walk is a `FolderListing`; a run keeps it in its output folder (inputs/) and a
resume or later worker reads it from there as a `SavedListing` (by row group, like a table)
instead of walking again. A tar shard is listed as one `TarShard`, a `Streamed` source read when its turn comes
(`stream_tar`), so its samples are never counted or fetched twice. A bad input never raises here:
it becomes a ref carrying its error.
"""
from __future__ import annotations

import dataclasses
import math
import os
import posixpath
import queue
import re
import sys
import tarfile
import threading
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from .storage import CREATE_PROTOCOLS, filesystem, is_local_fs, protocol_of, unstrip

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                              ".ppm", ".pgm", ".pbm", ".pnm"})
LIST_EXTENSIONS = frozenset({".txt", ".lst", ".list"})
TABLE_EXTENSIONS = frozenset({".parquet", ".csv", ".jsonl"})
PATH_COLUMNS = ("path", "url", "image_path", "filepath")
RESERVED_COLUMNS = ("id", "path")  # the outputs' own columns: a table's are renamed input_<name>


@dataclasses.dataclass(frozen=True)
class ImageRef:
    """One input. `id` is what the outputs report (a path/URL, or '<shard>/<key>').

    The bytes come from `data` (already read: a tar member), else from `path` on `fs` (None: the
    local filesystem). `error` marks an input known to be unreadable before decoding.
    """
    id: str
    path: str
    fs: Any = dataclasses.field(default=None, compare=False, repr=False)
    data: Optional[bytes] = dataclasses.field(default=None, compare=False, repr=False)
    error: Optional[str] = None
    meta: Optional[Dict[str, Any]] = dataclasses.field(default=None, compare=False)  # passthrough columns
    index: int = -1  # the output row key (extract.Plan assigns it)
    seed: int = -1  # per-sample augmentation seed (training); -1: deterministic transform
    members: Optional[Dict[str, bytes]] = dataclasses.field(default=None, compare=False, repr=False)  # a tar
    # sample's other members (cls, json, txt, ...): where fine-tuning finds labels

    def read_bytes(self) -> bytes:
        if self.data is not None:
            return self.data
        if self.fs is None or is_local_fs(self.fs):
            if not os.path.isfile(self.path):  # FIFOs, devices, folders: never block on them
                raise OSError(f"not a regular file: {self.path}" if os.path.exists(self.path)
                              else f"no such file: {self.path}")
            with open(self.path, "rb") as f:
                return f.read()
        return self.fs.cat_file(self.path)


class Streamed:
    """An input whose samples are known only while it is read, in one sequential pass (a tar shard).

    Extraction makes each one a unit of work of its own and reads it when that unit's turn comes,
    so its samples are never counted or fetched twice. A new kind implements `id` (what the run's
    identity fingerprints: a URL) and `stream()`; bad samples come out as refs carrying their error.
    """
    id: str

    def stream(self) -> Iterator["ImageRef"]:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class TarShard(Streamed):
    """A webdataset tar shard (see stream_tar)."""
    url: str
    path: str
    fs: Any = dataclasses.field(compare=False, repr=False)

    @property
    def id(self) -> str:
        return self.url

    def stream(self) -> Iterator["ImageRef"]:
        return stream_tar(self)


class Listed:
    """A run of inputs known up front, read in slices: `len()` inputs, `refs(lo, hi)` the ImageRefs of
    [lo, hi) in order, `id` what the run's identity fingerprints (None: each ref's id)."""
    id: Optional[str] = None

    def __len__(self) -> int:
        raise NotImplementedError

    def refs(self, lo: int, hi: int) -> List["ImageRef"]:
        raise NotImplementedError


def _version(info: Dict[str, Any]) -> str:
    """What changes when a file is rewritten: its size and ETag / generation / mtime."""
    v = (info.get("ETag") or info.get("etag") or info.get("generation") or info.get("mtime")
         or info.get("LastModified") or info.get("last_modified"))
    return f"{info.get('size')}/{v}"


class RefList(list, Listed):
    """Inputs listed one by one (folder walks, list files, csv/jsonl tables): held as ImageRefs."""

    def refs(self, lo: int, hi: int) -> List["ImageRef"]:
        return self[lo:hi]


class _RowGroups(Listed):
    """A listing stored as parquet, read a row group at a time when a unit needs its rows (one
    group cached: consecutive units share it). A group that cannot be read fails its rows, saying why."""
    url: str

    def __init__(self, row_groups: Sequence[int]):
        self.starts = np.concatenate([[0], np.cumsum(np.asarray(row_groups, np.int64))])
        self.num_rows = int(self.starts[-1])
        self._lock = threading.Lock()
        self._cached: Tuple[int, Any] = (-1, None)  # (row group, its rows)

    def __len__(self) -> int:
        return self.num_rows

    def _read_group(self, g: int):
        raise NotImplementedError

    def _to_refs(self, table, row0: int) -> List["ImageRef"]:
        raise NotImplementedError

    def _row_group(self, g: int):
        with self._lock:
            if self._cached[0] != g:
                self._cached = (g, self._read_group(g))
            return self._cached[1]

    def refs(self, lo: int, hi: int) -> List["ImageRef"]:
        first_row = lo
        try:
            out = []
            g = int(np.searchsorted(self.starts, lo, side="right")) - 1
            while lo < hi:
                first, last = int(self.starts[g]), int(self.starts[g + 1])
                out.extend(self._to_refs(self._row_group(g).slice(lo - first, min(hi, last) - lo), lo))
                lo, g = min(hi, last), g + 1
            return out
        except Exception as e:  # noqa: BLE001 - a table that changed or broke since listing: its rows fail, said
            return [ImageRef(f"{self.url}#row{n}", "", error=f"{self.url}: rows {first_row}-{hi - 1} could not be "
                                                              f"read ({type(e).__name__}: {e})")
                    for n in range(first_row, hi)]


class TableFile(_RowGroups):
    """A parquet table, listed from its footer alone (row count, schema): its rows become ImageRefs
    only when a unit needs them, so listing costs one footer read per file, whatever its size.
    `id` fingerprints the file (URL, size, etag or mtime, rows), not its rows."""

    def __init__(self, fs, path: str, column: str, renamed: Dict[str, str], info: Dict[str, Any],
                 row_groups: Sequence[int], file_types: Dict[str, Any], run_types: Dict[str, Any],
                 storage_options=None):
        super().__init__(row_groups)
        self.fs, self.path, self.url, self.column, self.renamed = fs, path, unstrip(fs, path), column, renamed
        self.file_types, self.run_types, self.storage_options = file_types, run_types, storage_options
        self.version = _version(info)
        self.id = f"table:{self.url}\0{self.version}\0{self.num_rows}"

    def _read_group(self, g: int):
        import pyarrow.parquet as pq

        now = _version(self.fs.info(self.path))
        if now != self.version:
            raise ValueError(f"the file changed since the run listed it (size, etag/mtime {self.version} -> "
                             f"{now}); a run reads the tables it started with: start a new run")
        with self.fs.open(self.path, "rb") as f:
            # use_threads=False: see sinks._parts (Arrow's pool beside gcsfs's gRPC can abort the exit)
            return pq.ParquetFile(f).read_row_group(g, columns=[self.column, *self.renamed], use_threads=False)

    def _to_refs(self, table, row0: int) -> List["ImageRef"]:
        return _table_refs(self.fs, self.path, table, self.column, self.renamed, self.storage_options, row0,
                           _converters(self.file_types, self.run_types, self.renamed))


LISTINGS = "inputs"  # where a run keeps the listings of its folder SRCs, inside the output folder
LISTING_ROWS = 1 << 16  # rows per row group of a saved listing


def _listing_key(url: str) -> str:
    import hashlib

    return hashlib.sha256(url.encode("utf-8", "surrogateescape")).hexdigest()[:16]


class FolderListing(RefList):
    """A folder's (or bucket prefix's) images as a walk found them. `id` names the folder, the
    count and a hash of the ids (what a saved listing of it also says), so a run that reads the
    listing saved in its output folder has the identity of the run that walked."""

    def __init__(self, url: str, refs: List["ImageRef"], problems: List["ImageRef"]):
        import hashlib

        super().__init__(refs)
        self.url, self.problems = url, problems
        h = hashlib.sha256()
        for r in refs:
            h.update(r.id.encode("utf-8", "surrogateescape") + b"\0")
        self.digest = h.hexdigest()
        self.id = f"folder:{url}\0{len(refs)}\0{self.digest}"

    def save(self, out) -> bool:
        """Keep this listing in `out` (a storage.Folder: the run's output folder) as
        inputs/<key>.parquet (id, path; row groups of LISTING_ROWS) and inputs/<key>.json (what was
        listed, when, its problems). Create-if-absent: of workers saving together one writes it.
        True if this call wrote it."""
        import io
        import json
        import time

        import pyarrow as pa
        import pyarrow.parquet as pq

        key = _listing_key(self.url)
        rel = f"{LISTINGS}/{key}-{self.digest[:16]}.parquet"
        buf = io.BytesIO()
        with pq.ParquetWriter(buf, pa.schema([("id", pa.string()), ("path", pa.string())])) as w:
            for lo in range(0, len(self), LISTING_ROWS):
                chunk = self[lo:lo + LISTING_ROWS]
                w.write_table(pa.table({"id": [r.id for r in chunk], "path": [r.path for r in chunk]}))
        create = out.create if out.local or protocol_of(out.url) in CREATE_PROTOCOLS else _write_if_absent(out)
        create(rel, buf.getvalue())  # named by its content: one that is there already is this listing
        meta = {"url": self.url, "rows": len(self), "sha256": self.digest, "file": posixpath.basename(rel),
                "listed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "problems": [[p.id, p.path, p.error] for p in self.problems]}
        return create(f"{LISTINGS}/{key}.json", json.dumps(meta, indent=1).encode())


def _write_if_absent(out):
    def create(rel: str, data: bytes) -> bool:  # a store without conditional writes: plain runs only
        if out.exists(rel):
            return False
        out.write(rel, data)
        return True
    return create


class SavedListing(_RowGroups):
    """A folder's listing kept in the output folder by the run's first lister (FolderListing.save),
    read a row group at a time: resumes and later workers neither walk the folder again nor hold
    its listing in memory. Images added to the folder since are not part of the run."""

    def __init__(self, out, meta: Dict[str, Any], storage_options=None):
        import pyarrow.parquet as pq

        self.url, self.digest, self.listed_at = meta["url"], meta["sha256"], meta.get("listed_at", "?")
        self.out, self.rel = out, f"{LISTINGS}/{meta['file']}"
        try:
            with out.fs.open(out.path(self.rel), "rb") as f:
                md = pq.ParquetFile(f).metadata
            groups = [md.row_group(g).num_rows for g in range(md.num_row_groups)]
        except Exception as e:  # noqa: BLE001 - missing or damaged: say which file and what to do
            raise ValueError(f"{out.url_of(self.rel)}, the saved listing of {self.url}, cannot be read "
                             f"({type(e).__name__}: {e}): the output folder was damaged; use a new one") from e
        super().__init__(groups)
        if self.num_rows != int(meta["rows"]):
            raise ValueError(f"{out.url_of(self.rel)}, the saved listing of {self.url}, holds {self.num_rows} rows, "
                             f"its {LISTINGS}/*.json says {meta['rows']}: the output folder was damaged; use a new one")
        self.id = f"folder:{self.url}\0{self.num_rows}\0{self.digest}"
        self.problems = [ImageRef(i, p, error=err) for i, p, err in meta.get("problems", [])]
        self.fs = None if "://" not in self.url else filesystem(self.url, storage_options)[0]

    def _read_group(self, g: int):
        import pyarrow.parquet as pq

        with self.out.fs.open(self.out.path(self.rel), "rb") as f:
            return pq.ParquetFile(f).read_row_group(g, use_threads=False)  # (see sinks._parts)

    def _to_refs(self, table, row0: int) -> List["ImageRef"]:
        return [ImageRef(i, p, self.fs) for i, p in zip(table.column("id").to_pylist(),
                                                        table.column("path").to_pylist())]


def saved_listing(out, url: str, storage_options=None) -> Optional[SavedListing]:
    """The listing of folder `url` kept in output folder `out`, or None."""
    import json

    try:
        meta = json.loads(out.read(f"{LISTINGS}/{_listing_key(url)}.json"))
    except FileNotFoundError:
        return None
    return SavedListing(out, meta, storage_options)


@dataclasses.dataclass
class Inputs:
    """Everything SRC names, in input order: ImageRefs (listed inputs) and Streamed sources (tar
    shards), plus the passthrough column names (tables) and problems met while listing (unreadable
    folders, symlink loops)."""
    items: List[Union[ImageRef, Listed, Streamed]]
    columns: List[str]
    problems: List[ImageRef]
    src: str = "SRC"  # what was listed, for messages
    column_types: Dict[str, Any] = dataclasses.field(default_factory=dict)  # column -> pyarrow type, one per run
    _recast: Dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)  # columns whose values need it
    saved_in: Any = None  # the output folder (storage.Folder) whose saved listings are read, if any

    def refs(self) -> Iterator[ImageRef]:
        """Every listed input's ImageRef in order (a parquet table's rows are read for this)."""
        for item in self.items:
            if isinstance(item, Listed):
                yield from item.refs(0, len(item))
            elif isinstance(item, ImageRef):
                yield item

    def save_listings(self, out) -> int:
        """Keep the listing of each folder SRC this process walked in output folder `out` (a
        storage.Folder; FolderListing.save), so that resumes and later workers read it instead of
        walking; returns how many were written."""
        return sum(item.save(out) for item in self.items if isinstance(item, FolderListing))


def _ext(name: str) -> str:
    return os.path.splitext(name)[1].lower()


def is_image_name(name: str) -> bool:
    return _ext(name) in IMAGE_EXTENSIONS


def expand_braces(pattern: str) -> List[str]:
    """webdataset's brace syntax: 'a-{000..002}.tar' -> a-000.tar, a-001.tar, a-002.tar (also {x,y})."""
    from braceexpand import braceexpand

    return list(braceexpand(pattern))


def list_inputs(src: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]],
                storage_options: Optional[Dict[str, Any]] = None,
                path_column: Optional[str] = None, output_dir: Optional[Any] = None) -> Inputs:
    """Every input of SRC in a deterministic order (see the module docstring).

    output_dir (a path/URL or storage.Folder): the run's output folder. A folder SRC whose listing
    a run saved there (Inputs.save_listings) is read from it instead of walked again."""
    from .storage import Folder

    srcs = [src] if isinstance(src, (str, os.PathLike)) else list(src)
    saved_in = output_dir if output_dir is None or isinstance(output_dir, Folder) else Folder(output_dir,
                                                                                             storage_options)
    out = Inputs([], [], [], src=", ".join(os.fspath(s) for s in srcs[:3]) + (" ..." if len(srcs) > 3 else ""),
                 saved_in=saved_in)
    for s in srcs:
        s = os.fspath(s)
        for url in (expand_braces(s) if "{" in s else [s]):
            _list_one(url, storage_options, path_column, out)
    _recast_columns(out)
    return out


def _unify_types(a, b):
    """One pyarrow type for a column two tables typed a and b: numbers -> float64, null -> the
    other, anything else -> string."""
    import pyarrow as pa

    if a == b or pa.types.is_null(b):
        return a
    if pa.types.is_null(a):
        return b
    if (pa.types.is_integer(a) or pa.types.is_floating(a)) and (pa.types.is_integer(b) or pa.types.is_floating(b)):
        return pa.float64()
    return pa.string()


def _add_column_types(out: Inputs, schema, renamed: Dict[str, str], where: str) -> None:
    """Record this table's passthrough column types; where tables disagree, one type for the run
    (every part of metadata/ must have one schema, or the writer and the readers fail), loudly."""
    import warnings

    import pyarrow as pa

    for c, name in renamed.items():
        t = schema.field(c).type
        have = out.column_types.get(name)
        if have is None:
            out.column_types[name] = t
            continue
        unified = _unify_types(have, t)
        if unified != have or (unified != t and not pa.types.is_null(t)):
            if unified != have or name not in out._recast:
                warnings.warn(f"column {name!r} is {t} in {where} but {have} in an earlier table: it is "
                              f"written as {unified} in every metadata part", UserWarning, stacklevel=2)
            out.column_types[name] = unified
            out._recast[name] = unified


def _recast_columns(out: Inputs) -> None:
    """Values of columns whose type was unified, converted to it (str / float); None stays None.
    (Rows of listed-only-by-footer TableFiles are converted when read.)"""
    import pyarrow as pa

    if not out._recast:
        return
    conv = {c: (str if pa.types.is_string(t) else float) for c, t in out._recast.items()}
    for ref in (r for item in out.items if isinstance(item, RefList) for r in item):  # TableFiles convert as read
        if ref.meta:
            for c, f in conv.items():
                if ref.meta.get(c) is not None:
                    ref.meta[c] = f(ref.meta[c])
    out._recast.clear()


def _list_one(url: str, storage_options, path_column, out: Inputs) -> None:
    fs, path = filesystem(url, storage_options)
    if not is_local_fs(fs):
        fs.invalidate_cache()  # list what is there now, not what this process saw before
    if any(c in path for c in "*?[") and not fs.exists(path):
        matches = sorted(fs.glob(path))
        if not matches:
            raise FileNotFoundError(f"no files match {url}")
        for m in matches:
            _list_one(unstrip(fs, m), storage_options, path_column, out)
        return
    if fs.isdir(path):
        folder_url = os.path.abspath(path) if is_local_fs(fs) else unstrip(fs, path)
        saved = saved_listing(out.saved_in, folder_url, storage_options) if out.saved_in is not None else None
        if saved is not None:
            print(f"note: {url}: read from the listing this run saved in {out.saved_in.url_of(saved.rel)} at "
                  f"{saved.listed_at} ({len(saved)} images), not walked again; images added since are not part of "
                  f"this run (a new output folder lists the folder anew)", file=sys.stderr, flush=True)
            out.items.append(saved)
            out.problems.extend(saved.problems)
            return
        refs, containers, problems = (_walk_local(path) if is_local_fs(fs) else _walk_remote(fs, path))
        out.problems.extend(problems)
        if refs or not containers:
            if refs:
                out.items.append(FolderListing(folder_url, refs, problems))
            if containers:
                _warn_skipped(url, containers, f"{len(refs)} images were read; a folder holding images is read "
                                               f"as its images")
            return
        # no images: the folder is a dataset of tar shards (tables beside them are their metadata, as
        # img2dataset writes NNNNN.parquet beside NNNNN.tar: reading both would do every image twice),
        # or else of tables
        tars = [c for c in containers if is_tar_name(c)]
        if tars and len(tars) < len(containers):
            _warn_skipped(url, [c for c in containers if not is_tar_name(c)],
                          f"its {len(tars)} tar shards were read; tables beside shards are taken for their metadata")
        for c in tars or containers:
            _list_one(unstrip(fs, c) if not is_local_fs(fs) else c, storage_options, path_column, out)
        return
    if not fs.exists(path):
        raise FileNotFoundError(f"input not found: {url}")
    ext = _ext(path)
    if is_tar_name(path):
        out.items.append(TarShard(unstrip(fs, path), path, fs))
    elif ext in LIST_EXTENSIONS:
        out.items.extend(_read_list(fs, path, storage_options))
    elif ext in TABLE_EXTENSIONS:
        out.items.extend(_read_table(fs, path, storage_options, path_column, out))  # a Listed, not its rows
    elif is_image_name(path):
        out.items.append(_ref(fs, path))
    else:
        raise ValueError(f"{url}: not a folder, image, .tar shard, list file ({', '.join(sorted(LIST_EXTENSIONS))}) "
                         f"or table ({', '.join(sorted(TABLE_EXTENSIONS))})")


def _warn_skipped(url: str, skipped: List[str], why: str) -> None:
    import warnings

    names = ", ".join(os.path.basename(c.rstrip("/")) for c in skipped[:3]) + (" ..." if len(skipped) > 3 else "")
    warnings.warn(f"{url}: {len(skipped)} files were not read ({names}): {why}; name them to read them "
                  f"(e.g. '{url.rstrip('/')}/*{_ext(skipped[0]) or '.tar'}')", UserWarning, stacklevel=3)


def _ref(fs, path: str, id: Optional[str] = None, **kw) -> ImageRef:
    url = unstrip(fs, path)
    return ImageRef(id or url, path, None if is_local_fs(fs) else fs, **kw)


TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


def is_tar_name(name: str) -> bool:
    """A webdataset shard: .tar, or a compressed one (.tar.gz / .tgz / .tar.bz2 / .tar.xz)."""
    return name.lower().endswith(TAR_SUFFIXES)


def _is_container(name: str) -> bool:
    """A table or tar shard, what a folder without images is read as."""
    return _ext(name) in TABLE_EXTENSIONS or is_tar_name(name)


def _walk_local(root: str) -> Tuple[List[ImageRef], List[str], List[ImageRef]]:
    """(images, tables and tar shards, problems) below root: os.walk following symlinks, but each
    real folder once (a link back up is a loop, reported)."""
    refs, containers, problems, seen = [], [], [], set()

    def onerror(err: OSError):
        problems.append(ImageRef(err.filename or root, err.filename or root,
                                 error=f"cannot list folder {err.filename}: {err.strerror or err}"))

    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=onerror):
        real = os.path.realpath(dirpath)
        if real in seen:
            problems.append(ImageRef(dirpath, dirpath, error=f"symlink loop: {dirpath} is {real}, already listed"))
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames.sort()
        for name in sorted(filenames):
            p = os.path.join(dirpath, name)
            if is_image_name(name):
                refs.append(ImageRef(p, p))
            elif _is_container(name):
                containers.append(p)
    return refs, containers, problems


def _walk_remote(fs, root: str) -> Tuple[List[ImageRef], List[str], List[ImageRef]]:
    found = sorted(fs.find(root))
    return [_ref(fs, p) for p in found if is_image_name(p)], [p for p in found if _is_container(p)], []


def _join(fs, base_dir: str, entry: str, storage_options) -> Tuple[Any, str]:
    """An entry of a list/table: a URL, an absolute path, or a path relative to the list's folder."""
    if "://" in entry:
        return filesystem(entry, storage_options)
    if is_local_fs(fs):
        return fs, entry if os.path.isabs(entry) else os.path.normpath(os.path.join(base_dir, entry))
    return fs, entry.lstrip("/") if entry.startswith("/") else posixpath.join(base_dir, entry)


def _read_list(fs, path: str, storage_options) -> List[ImageRef]:
    base = posixpath.dirname(path) if not is_local_fs(fs) else os.path.dirname(path)
    refs = []
    for line in fs.cat_file(path).decode("utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        efs, epath = _join(fs, base, line, storage_options)
        refs.append(ImageRef(line, epath, None if is_local_fs(efs) else efs))
    return refs


def _path_column(fs, path: str, names: Sequence[str], path_column: Optional[str]) -> str:
    col = path_column or next((c for c in PATH_COLUMNS if c in names), None)
    if col is None or col not in names:
        wanted = repr(path_column) if path_column else " or ".join(PATH_COLUMNS)
        raise ValueError(f"{unstrip(fs, path)}: no {wanted} column (it has {', '.join(names)}); "
                         f"name the column with `path_column`")
    return col


def _table_columns(fs, path: str, schema, path_column: Optional[str], out: Inputs) -> Tuple[str, Dict[str, str]]:
    """(path column, {passthrough column: its output name}), recorded in `out`."""
    names = schema.names
    col = _path_column(fs, path, names, path_column)
    renamed = {c: (f"input_{c}" if c in RESERVED_COLUMNS else c) for c in names if c != col}
    for c in renamed.values():
        if c not in out.columns:
            out.columns.append(c)
    _add_column_types(out, schema, renamed, unstrip(fs, path))
    return col, renamed


def _read_table(fs, path: str, storage_options, path_column: Optional[str], out: Inputs) -> List[Listed]:
    ext = _ext(path)
    if ext == ".parquet":  # the footer only: rows are read when their unit runs
        import pyarrow.parquet as pq

        try:
            with fs.open(path, "rb") as f:
                meta = pq.ParquetFile(f).metadata
        except Exception as e:  # noqa: BLE001 - not parquet, truncated: name the file
            raise ValueError(f"{unstrip(fs, path)}: not a readable parquet file ({type(e).__name__}: {e})") from e
        schema = meta.schema.to_arrow_schema()
        col, renamed = _table_columns(fs, path, schema, path_column, out)
        return [TableFile(fs, path, col, renamed, fs.info(path), [meta.row_group(g).num_rows
                                                                  for g in range(meta.num_row_groups)],
                          {c: schema.field(c).type for c in renamed}, out.column_types, storage_options)]
    with fs.open(path, "rb") as f:
        if ext == ".csv":
            import pyarrow.csv as pacsv
            table = pacsv.read_csv(f)
        else:
            import pyarrow.json as pajson
            table = pajson.read_json(f)
    col, renamed = _table_columns(fs, path, table.schema, path_column, out)
    return [RefList(_table_refs(fs, path, table, col, renamed, storage_options, 0))]


def _converters(file_types: Dict[str, Any], run_types: Dict[str, Any], renamed: Dict[str, str]) -> Dict[str, Callable]:
    """Output column -> str / float, where the run's type of a column differs from this file's."""
    import pyarrow as pa

    return {name: (str if pa.types.is_string(run_types[name]) else float) for c, name in renamed.items()
            if name in run_types and run_types[name] != file_types[c] and not pa.types.is_null(run_types[name])}


def _table_refs(fs, path: str, table, col: str, renamed: Dict[str, str], storage_options, row0: int,
                conv: Optional[Dict[str, Callable]] = None) -> List[ImageRef]:
    """A ref per row of `table` (rows row0.. of the file at path)."""
    base = posixpath.dirname(path) if not is_local_fs(fs) else os.path.dirname(path)
    rest = list(renamed)
    rows = table.select(rest).to_pylist() if rest else [{}] * table.num_rows
    refs, conv = [], conv or {}
    for n, (entry, row) in enumerate(zip(table.column(col).to_pylist(), rows), row0):
        meta = {renamed[k]: _plain(v) for k, v in row.items()}
        for c, f in conv.items():
            if meta.get(c) is not None:
                meta[c] = f(meta[c])
        if entry is None or str(entry).strip() == "":
            refs.append(ImageRef(f"{unstrip(fs, path)}#row{n}", "", error=f"empty {col!r} value", meta=meta))
            continue
        entry = str(entry)
        efs, epath = _join(fs, base, entry, storage_options)
        refs.append(ImageRef(entry, epath, None if is_local_fs(efs) else efs, meta=meta))
    return refs


def _plain(v):
    return v.item() if isinstance(v, np.generic) else v


# ---- webdataset tar shards ------------------------------------------------------------------------
_KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext


def stream_tar(shard: TarShard, block_size: int = 8 << 20) -> Iterator[ImageRef]:
    """Samples of a webdataset shard in order, read as ONE sequential stream.

    Consecutive members with the same key (webdataset's rule: the name up to the first dot of its
    last path part) form a sample. Its image member is the one with an image extension, and its id
    is '<shard>/<key>'. A sample with several image members (`000.jpg` + `000.png`, or
    `frame.0001.jpg, frame.0002.jpg`, which share the key `frame`) gives a row per image member,
    with ids '<shard>/<key>.<ext>' that say which. A member name repeated inside a sample (webdataset
    refuses such shards) keeps the first; each repeat becomes an error ref. A sample without an
    image member is an error ref too. A shard that is cut short (inside a member, its padding or a
    header, or without tar's end-of-archive blocks) yields every complete image before the cut and
    one error ref for the rest.
    """
    current, files, last, dups, links = None, {}, None, [], []
    seen: Dict[str, int] = {}  # key -> how many samples had it (a key again later: '#2', '#3' ids)

    def samples(key, members, repeats, linked=()):
        seen[key] = seen.get(key, 0) + 1
        sid = f"{shard.url}/{key}" + (f"#{seen[key]}" if seen[key] > 1 else "")
        images = [ext for ext in members if "." + ext.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS]
        if not images and not linked:
            yield ImageRef(sid, shard.url, error=f"{sid}: no image member (has {', '.join(sorted(members)) or 'none'})")
        others = {ext: v for ext, v in members.items() if ext not in images}
        for ext in images:
            yield ImageRef(sid if len(images) == 1 else f"{sid}.{ext}", shard.url, data=members[ext], members=others)
        for n, name in enumerate(repeats, 2):
            yield ImageRef(f"{shard.url}/{name}#{n}", shard.url,
                           error=f"{shard.url}: member {name} appears again in the same sample (a webdataset "
                                 f"shard may hold each name once); the first was kept, this one was not read")
        for name, kind in linked:
            yield ImageRef(f"{shard.url}/{name}", shard.url,
                           error=f"{shard.url}: member {name} is a {kind}, not a file: links inside a shard are "
                                 f"not followed (webdataset skips them); store the image itself")

    def has_image(members):
        return any("." + ext.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS for ext in members)

    try:
        opener = open(shard.path, "rb") if is_local_fs(shard.fs) else shard.fs.open(shard.path, "rb",
                                                                                      block_size=block_size)
        with opener as f, tarfile.open(fileobj=f, mode="r|*") as tf:  # r|*: also gzip/bz2/xz streams
            for m in tf:
                if not (m.isfile() or m.issym() or m.islnk()):
                    continue  # folders and devices carry no sample
                match = _KEY_RE.match(m.name)
                key, ext = (match.group(1), match.group(2)) if match else (m.name, "")
                if key != current and current is not None:
                    yield from samples(current, files, dups, links)
                    files, dups, links = {}, [], []
                current = key
                if not m.isfile():
                    if is_image_name(m.name):  # an image we cannot read: said, not dropped
                        links.append((m.name, "symlink" if m.issym() else "hard link"))
                    last = m.name
                    continue
                data = tf.extractfile(m).read()
                last = m.name
                if ext in files:
                    dups.append(m.name)
                else:
                    files[ext] = data
            end, compressed = tf.offset, getattr(tf.fileobj, "comptype", "tar") != "tar"
        size = os.path.getsize(shard.path) if is_local_fs(shard.fs) else shard.fs.size(shard.path)
        if not compressed and size is not None and size - end < tarfile.BLOCKSIZE:
            raise tarfile.ReadError(f"it ends at byte {size}, inside or right after member {last or '(none)'}, "
                                    f"without tar's end-of-archive blocks: the shard was cut short")
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        if current is not None and (has_image(files) or links):
            yield from samples(current, files, dups, links)  # every image member read before the cut is whole
        if last:
            said = f"unreadable after member {last} ({type(e).__name__}: {e}); the complete samples before it were kept"
        else:
            said = (f"unreadable at its start ({type(e).__name__}: {e}): not a tar archive (plain, gzip, bz2 "
                    f"or xz), or empty; nothing of it was read")
        yield ImageRef(f"{shard.url}#unreadable", shard.url, error=f"{shard.url}: {said}")
        return
    if current is not None:
        yield from samples(current, files, dups, links)


def prefetch(producers: Iterable[Callable[[], Iterable]], ahead: int = 2, queue_size: int = 256) -> Iterator:
    """Items of producers[0](), then producers[1](), ... in order, with up to `ahead` producers
    running in background threads (bounded queues), so the next tar shards stream in while this one
    is decoded. `producers` may be lazy (an elastic worker claims a unit only when it is about to
    be read). An exception inside a producer is re-raised here."""
    import collections

    done = object()
    stop = threading.Event()
    pending = iter(producers)
    running: "collections.deque[queue.Queue]" = collections.deque()

    def run(q: queue.Queue, producer) -> None:
        try:
            for item in producer():
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put(e)

    def fill() -> None:
        while len(running) < max(1, ahead):
            producer = next(pending, None)
            if producer is None:
                return
            q: queue.Queue = queue.Queue(queue_size)
            threading.Thread(target=run, args=(q, producer), daemon=True,
                             name=f"beit-prefetch-{len(running)}").start()
            running.append(q)

    try:
        fill()
        while running:
            q = running[0]
            while True:
                item = q.get()
                if item is done:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
            running.popleft()
            fill()
    finally:
        stop.set()


# ---- labelled inputs (fine-tuning) ------------------------------------------------------------------
LABEL_COLUMNS = ("label", "labels", "class", "target")


def list_labelled(src: Union[str, os.PathLike], label_column: Optional[str] = None, path_column: Optional[str] = None,
                  storage_options: Optional[Dict[str, Any]] = None) -> Tuple[List[ImageRef], np.ndarray, List[str]]:
    """(refs, int32 labels, class names) of a labelled image set, in a deterministic order:

    - a folder or bucket prefix laid out as an ImageFolder (ROOT/CLASS/**/IMAGE: the class is the
      folder under ROOT; classes sorted by name, images in os.walk order within each);
    - a table (.parquet / .csv / .jsonl, or a glob / {a,b} list of tables) with a path column (as
      extract reads it: `path_column`, or path/url/...) and `label_column` (default: label, labels,
      class or target): class indices (ints; the names are then '0'..'K-1') or class names
      (strings; sorted). Rows in table order.
    Webdataset shards are streamed instead (`shard_urls`, `finetune.stream`).
    """
    src = os.fspath(src)
    fs, path = filesystem(src, storage_options)
    if any(c in src for c in "*?{") or _ext(path) in TABLE_EXTENSIONS or (not fs.isdir(path) and fs.exists(path)):
        return _labelled_table(src, label_column, path_column, storage_options)
    if is_tar_name(path) or (fs.isdir(path) and any(is_tar_name(p) for p in fs.ls(path, detail=False)[:1000])):
        raise ValueError(f"{src} is webdataset shards: they are streamed (shard_urls, finetune.stream), not listed")
    if label_column:
        raise ValueError(f"`label_column` is for tables; {src} is a folder (its classes are its sub-folders)")
    return list_image_folder(src, storage_options)


def shard_urls(src: Union[str, os.PathLike], storage_options: Optional[Dict[str, Any]] = None) -> Optional[List[TarShard]]:
    """The webdataset shards `src` names (a brace pattern, a glob, a .tar, or a folder/prefix of
    tars), in list order; None when src is not shards."""
    src = os.fspath(src)
    names = expand_braces(src) if "{" in src else [src]
    if not all(is_tar_name(n) for n in names):  # a glob or a folder: tars among what it names? (names only)
        fs, path = filesystem(src, storage_options)
        found = (fs.glob(path) if any(c in src for c in "*?[") else
                 fs.ls(path, detail=False) if fs.isdir(path) else [])
        if not any(is_tar_name(p) for p in found):
            return None
    items = list_inputs(src, storage_options).items
    shards = [i for i in items if isinstance(i, TarShard)]
    if not shards:
        return None
    if len(shards) < len(items):
        raise ValueError(f"{src} names both tar shards and other inputs: fine-tune on one kind at a time")
    return shards


def _labelled_table(src: str, label_column: Optional[str], path_column: Optional[str], storage_options):
    inputs = list_inputs(src, storage_options, path_column)
    if any(isinstance(item, Streamed) for item in inputs.items):
        raise ValueError(f"{src} is webdataset shards: they are streamed (shard_urls, finetune.stream), not listed")
    col = label_column or next((c for c in LABEL_COLUMNS if c in inputs.columns), None)
    if col is None or col not in inputs.columns:
        wanted = repr(label_column) if label_column else ", ".join(LABEL_COLUMNS[:-1]) + " or " + LABEL_COLUMNS[-1]
        has = ", ".join(inputs.columns) or "no other columns"
        raise ValueError(f"{src}: no {wanted} column to take labels from (it has {has}): name it with `label_column`")
    refs = list(inputs.refs())
    if not refs:
        raise ValueError(f"{src}: the table has no rows")
    values = [(r.meta or {}).get(col) for r in refs]
    missing = [r.id for r, v in zip(refs, values)
               if v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip())]
    if missing:
        raise ValueError(f"{src}: {len(missing)} rows have no {col!r} value (first: {missing[0]}): give every "
                         f"row a label, or drop those rows")
    if all(isinstance(v, (int, np.integer)) or (isinstance(v, float) and v.is_integer()) for v in values):
        labels = np.asarray([int(v) for v in values], np.int64)
        if labels.min() < 0:
            bad = int(np.argmin(labels))
            raise ValueError(f"{src}: {refs[bad].id} has label {labels[bad]}: class indices start at 0")
        classes = [str(i) for i in range(int(labels.max()) + 1)]
    else:
        names = [str(v).strip() for v in values]
        classes = sorted(set(names))
        index = {c: i for i, c in enumerate(classes)}
        labels = np.asarray([index[n] for n in names], np.int64)
    return refs, labels.astype(np.int32), classes


def _walk_order(rel: str):
    """os.walk's order for a relative posix path: a folder's files before its sub-folders' files."""
    parts = rel.split("/")
    return tuple(parts[:-1]), parts[-1]


def list_image_folder(root: Union[str, os.PathLike],
                      storage_options: Optional[Dict[str, Any]] = None) -> Tuple[List[ImageRef], np.ndarray, List[str]]:
    """An ImageFolder layout (one sub-folder per class), local or a bucket prefix: (refs, int
    labels, sorted class names)."""
    root = os.fspath(root)
    fs, path = filesystem(root, storage_options)
    if not is_local_fs(fs):
        fs.invalidate_cache(path)
        if not fs.isdir(path):
            raise FileNotFoundError(f"image folder not found: {root}")
        base = path.rstrip("/") + "/"
        by_class: Dict[str, List[str]] = {}
        for p in fs.find(path):
            rel = p[len(base):] if p.startswith(base) else None
            if rel and "/" in rel and is_image_name(rel) and not rel.startswith("."):
                by_class.setdefault(rel.split("/", 1)[0], []).append(rel.split("/", 1)[1])
        if not by_class:
            raise ValueError(f"{root}: no class sub-folders with images (expected ROOT/CLASS/IMAGE files)")
        classes = sorted(by_class)  # a prefix holds no empty folders: every class listed has images
        refs = [_ref(fs, base + c + "/" + r) for c in classes for r in sorted(by_class[c], key=_walk_order)]
        labels = [k for k, c in enumerate(classes) for _ in by_class[c]]
        return refs, np.asarray(labels, np.int32), classes
    root = path if root.startswith("file://") else root
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder not found: {root}")
    # hidden folders (.ipynb_checkpoints, .cache) are not classes
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    if not classes:
        raise ValueError(f"{root}: no class sub-folders (expected ROOT/CLASS/IMAGE files)")
    refs, labels, empty = [], [], []
    for label, name in enumerate(classes):
        found = _walk_local(os.path.join(root, name))[0]
        if not found:
            empty.append(name)
        refs.extend(found)
        labels.extend([label] * len(found))
    if empty:
        raise ValueError(f"{root}: class folders without images: {empty[:10]} (a class no image teaches; the model's "
                         f"head would be sized for it): remove them or add their images")
    return refs, np.asarray(labels, np.int32), classes
