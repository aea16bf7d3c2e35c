"""Every path is a URL: local paths and any fsspec URL (s3://, gs://, hf://, https://, memory://).

Credentials and endpoints come the standard way for each filesystem (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, ... for S3; GOOGLE_APPLICATION_CREDENTIALS for GCS), plus `storage_options`
(CLI: --storage-options JSON) for anything else. s3fs / gcsfs / aiohttp are optional extras; a
missing one is an error naming the extra to install.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import posixpath
import socket
import threading
import time
import uuid
from typing import Any, Dict, Iterator, List, Optional, Tuple

from ._io import atomic_write, temp_name

LOCK_NAME = ".beit-jax.lock"
LOCK_STALE_S = 60.0  # a bucket lock whose heartbeat is older than this belongs to a dead writer
LOCK_HEARTBEAT_S = 15.0


class StorageFullError(OSError):
    """The output's device or quota is full."""


class OutputLockedError(RuntimeError):
    """Another writer holds the output folder."""

CREATE_PROTOCOLS = ("s3", "s3a", "gs", "gcs")  # fsspec backends whose pipe_file(mode="create") is conditional
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "http": "http", "https": "http"}


def protocol_of(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def filesystem(url: str, storage_options: Optional[Dict[str, Any]] = None):
    """(fsspec filesystem, path inside it) for a URL or local path (`fsspec.core.url_to_fs`;
    fsspec reuses filesystems of the same options). A missing backend names the extra to install."""
    import fsspec.core

    url = os.fspath(url)
    protocol = protocol_of(url)
    if protocol in ("file", "local"):
        path = url.split("://", 1)[1] if "://" in url else url
        return fsspec.filesystem("file"), os.path.abspath(os.path.expanduser(path))
    try:
        return fsspec.core.url_to_fs(url, **(storage_options or {}))
    except ImportError as e:
        extra = EXTRAS.get(protocol)
        hint = f"pip install 'beit-jax[{extra}]'" if extra else f"install the fsspec backend for {protocol}://"
        raise ImportError(f"{protocol}:// paths need an extra package: {hint} ({e})") from e
    except ValueError as e:  # "Protocol not known"
        raise ValueError(f"{protocol}:// is not a storage protocol fsspec knows ({e})") from e


def unstrip(fs, path: str) -> str:
    """The URL of `path` inside `fs` (what users see in ids and messages)."""
    return path if is_local_fs(fs) else fs.unstrip_protocol(path)


def is_local_fs(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def join_url(base: str, *parts: str) -> str:
    """`base/part/...` for a local path (os.path.join) or a URL (posix joins after the scheme)."""
    base = os.fspath(base)
    if protocol_of(base) in ("file", "local"):
        return os.path.join(base, *parts)
    return posixpath.join(base, *parts)


def check_bucket(url: str, storage_options: Optional[Dict[str, Any]] = None) -> None:
    """Refuse an output URL whose bucket does not exist (or cannot be seen), before any work."""
    fs, path = filesystem(url, storage_options)
    if is_local_fs(fs):
        return
    bucket = path.split("/", 1)[0]
    try:
        fs.invalidate_cache(bucket)
        ok = fs.exists(bucket)
    except OSError:
        ok = False
    if not ok:
        raise FileNotFoundError(f"`output_dir` {url}: its bucket {protocol_of(url)}://{bucket} does not exist or "
                                f"cannot be read with these credentials: create it (or fix the credentials) first")


def _in_folder(url: str, storage_options: Optional[Dict[str, Any]] = None) -> Tuple["Folder", str]:
    """(the Folder holding the file at `url`, the file's name in it)."""
    url = os.fspath(url)
    parent, name = (os.path.split if protocol_of(url) in ("file", "local") else posixpath.split)(url)
    return Folder(parent, storage_options), name


def write_whole(url: str, data: bytes, storage_options: Optional[Dict[str, Any]] = None) -> None:
    """Write the file at `url` whole (Folder.write: locally a temp file renamed over it, on a bucket
    one PUT), so a reader or a crash never sees half of it and the previous version stays until
    the new one is complete."""
    folder, name = _in_folder(url, storage_options)
    folder.write(name, data)


def read_whole(url: str, storage_options: Optional[Dict[str, Any]] = None) -> bytes:
    folder, name = _in_folder(url, storage_options)
    return folder.read(name)


def url_exists(url: str, storage_options: Optional[Dict[str, Any]] = None) -> bool:
    folder, name = _in_folder(url, storage_options)
    return folder.exists(name)


@contextlib.contextmanager
def staged_folder(url: str, storage_options: Optional[Dict[str, Any]] = None) -> Iterator[str]:
    """A local folder to write a set of files into (with code that writes local paths) that ends up
    at `url`: `url` itself when it is local; else a temporary folder whose files are uploaded one
    whole object each (Folder.write) when the block ends without an error, then removed."""
    folder = Folder(url, storage_options)
    if folder.local:
        folder.makedirs()
        yield folder.root
        return
    import tempfile

    with tempfile.TemporaryDirectory(prefix="beit-jax-stage-") as tmp:
        yield tmp
        for dirpath, _, names in os.walk(tmp):
            for name in sorted(names):
                local = os.path.join(dirpath, name)
                with open(local, "rb") as f:
                    folder.write(os.path.relpath(local, tmp).replace(os.sep, "/"), f.read())


class Folder:
    """A folder on any filesystem that beit-jax writes whole files into.

    write(): local files are atomic (temp file, fsync, rename, folder fsync); object-store writes
    put the whole object in one request, so an object exists complete or not at all.
    """

    def __init__(self, url: str, storage_options: Optional[Dict[str, Any]] = None):
        self.url = url = os.fspath(url)
        self.fs, self.root = filesystem(url, storage_options)
        self.local = is_local_fs(self.fs)

    def path(self, rel: str) -> str:
        return posixpath.join(self.root, rel) if not self.local else os.path.join(self.root, rel)

    def url_of(self, rel: str) -> str:
        return unstrip(self.fs, self.path(rel))

    def makedirs(self, rel: str = "") -> None:
        if self.local:
            os.makedirs(self.path(rel) if rel else self.root, exist_ok=True)

    def _fresh(self, path: str) -> str:
        """Drop cached listings: other processes (hosts of the same run) write here too."""
        if not self.local:
            self.fs.invalidate_cache(path)
        return path

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self._fresh(self.path(rel)))

    def write(self, rel: str, data: bytes) -> None:
        path = self.path(rel)
        try:
            if self.local:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                atomic_write(path, data)
            else:
                self.fs.pipe_file(path, data)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StorageFullError(errno.ENOSPC, f"no space left on the device writing {self.url_of(rel)} "
                                                     f"({len(data)} bytes)") from e
            raise

    def create(self, rel: str, data: bytes) -> bool:
        """Write `rel` whole only if it does not exist yet, atomically: True if this call created it,
        False if it was there (whoever wrote it first wins, also against other hosts). Local: a
        temp file hard-linked into place; buckets: a conditional PUT (S3 `If-None-Match: *`, GCS
        `ifGenerationMatch=0`) through fsspec's `mode="create"`."""
        path = self.path(rel)
        if self.local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = temp_name(path) + f"-{threading.get_ident()}"
            try:
                atomic_write(tmp, data)
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    return False
                return True
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        protocol = protocol_of(self.url)
        if protocol not in CREATE_PROTOCOLS:
            raise NotImplementedError(f"{self.url}: elastic workers need create-if-absent writes, which beit-jax "
                                      f"knows for local folders, s3:// and gs:// (not {protocol}://)")
        try:
            self.fs.pipe_file(path, data, mode="create")
        except (FileExistsError, PermissionError) as e:  # 412 Precondition Failed
            if self.fs.exists(self._fresh(path)):
                return False
            raise OSError(f"conditional write of {self.url_of(rel)} refused ({e}); the store may not support "
                          f"create-if-absent writes") from e
        except OSError as e:
            if "precondition" in str(e).lower() or "412" in str(e):
                return False
            raise
        finally:
            self._fresh(path)
        return True

    def stats(self, rel: str = "") -> Dict[str, tuple]:
        """{name: (size, version)} of the files directly in `rel` (one listing): version is the
        object's ETag / generation, or the local mtime, which changes whenever a file is rewritten."""
        base = self._fresh(self.path(rel) if rel else self.root)
        try:
            entries = self.fs.ls(base, detail=True)
        except FileNotFoundError:
            return {}
        out = {}
        for e in entries:
            if e.get("type", "file") != "file":
                continue
            version = e.get("ETag") or e.get("etag") or e.get("generation") or e.get("mtime") or e.get("LastModified")
            out[posixpath.basename(e["name"].rstrip("/"))] = (int(e.get("size") or 0), str(version))
        return out

    def check_writable(self) -> None:
        """Refuse, before any work, an output that is a file or cannot be written.

        Probes with a file of this process's own (removed at once) in the output folder, or in its
        nearest existing parent while the folder is still to be made (the run makes it when it
        writes). No folder is made or removed here: the hosts of one run probe the same path at the
        same moment, and one removing a folder it had just made broke another's probe.
        """
        if not self.local:
            return  # a bucket shows it when the writer lock is taken
        head = os.path.abspath(self.root)
        while not os.path.exists(head):
            head = os.path.dirname(head)
        if not os.path.isdir(head):
            what = "" if head == os.path.abspath(self.root) else f" is inside {head}, which"
            raise NotADirectoryError(f"`output_dir` {self.root}{what} is a file, not a folder: choose a folder")
        probe = temp_name(os.path.join(head, "write-probe"))
        try:
            with open(probe, "wb") as f:
                f.write(b"")
            os.remove(probe)
        except OSError as e:
            raise PermissionError(f"cannot write to `output_dir` {self.root} ({e.strerror or e}): choose a "
                                  f"folder you can write to") from e

    def read(self, rel: str) -> bytes:
        return self.fs.cat_file(self._fresh(self.path(rel)))

    def read_many(self, rels: List[str]) -> Dict[str, Any]:
        """{rel: bytes, or the exception reading it raised} for many small files: on a bucket as
        concurrent requests (fsspec's batched `cat`), not one round trip after another."""
        if self.local or not rels:
            out: Dict[str, Any] = {}
            for rel in rels:
                try:
                    out[rel] = self.read(rel)
                except OSError as e:
                    out[rel] = e
            return out
        import fsspec.core

        paths = {self.path(rel): rel for rel in rels}
        got = self.fs.cat(list(paths), on_error="return")
        return {paths[p] if p in paths else paths[fsspec.core.strip_protocol(p)]: v for p, v in got.items()}

    def sizes(self, rel: str = "") -> Dict[str, int]:
        """{relative path: size} of every file under `rel` (one listing, not one request per file)."""
        import fsspec.core

        base = self._fresh(self.path(rel) if rel else self.root)
        if not self.fs.exists(base):
            return {}
        found = self.fs.find(base, detail=True)
        root = self.root.rstrip("/") + "/"
        out = {}
        for p, info in found.items():
            p = p if self.local or "://" not in p else fsspec.core.strip_protocol(p)
            if info.get("type", "file") == "file" and p.startswith(root):
                out[p[len(root):].replace(os.sep, "/")] = int(info.get("size") or 0)
        return out

    def remove(self, rel: str) -> None:
        """Delete one file of ours (a part of a unit being redone); a missing one is fine."""
        try:
            self.fs.rm_file(self.path(rel))
        except FileNotFoundError:
            pass

    def listdir(self, rel: str = "") -> List[str]:
        base = self._fresh(self.path(rel) if rel else self.root)
        if not self.fs.exists(base):
            return []
        return sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(base, detail=False))


class WriterLock:
    """One writer per output folder, refused with a clear message otherwise.

    Local folders: an exclusive `flock` on OUT/.beit-jax.lock (the kernel drops it when the writer
    dies, however it dies). Buckets: a lock object naming its owner (host, pid) with a heartbeat
    refreshed every 15 s; a fresh one is refused, one left by a dead process of this host or
    without a heartbeat for 60 s is taken over. Release removes only the lock this writer wrote.
    """

    def __init__(self, folder: Folder):
        self.folder = folder
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex}
        self._fd = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _describe(self, info: Dict[str, Any]) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("since", 0)))
        return f"pid {info.get('pid')} on host {info.get('host')}, since {since}"

    def acquire(self) -> "WriterLock":
        if self.folder.local:
            import fcntl

            self.folder.makedirs()
            path = self.folder.path(LOCK_NAME)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    info = json.loads(os.pread(fd, 4096, 0) or b"{}")
                finally:
                    os.close(fd)
                raise OutputLockedError(f"{self.folder.url} is being written by another beit-jax extract "
                                        f"({self._describe(info)}); wait for it to finish, or use another `output_dir`")
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(dict(self.owner, since=time.time())).encode(), 0)
            self._fd = fd
            return self
        self._acquire_remote()
        return self

    def _acquire_remote(self) -> None:
        if self.folder.exists(LOCK_NAME):
            try:
                info = json.loads(self.folder.read(LOCK_NAME))
            except (ValueError, FileNotFoundError):
                info = {}
            age = time.time() - float(info.get("heartbeat", 0))
            dead_here = info.get("host") == self.owner["host"] and not _pid_alive(int(info.get("pid", -1)))
            if info and age < LOCK_STALE_S and not dead_here:
                raise OutputLockedError(
                    f"{self.folder.url} is being written by another beit-jax extract ({self._describe(info)}, "
                    f"last heartbeat {age:.0f}s ago); wait for it to finish or use another `output_dir`. A lock left by "
                    f"a killed run on another host expires {LOCK_STALE_S:.0f}s after its last heartbeat.")
        self._write_remote()
        time.sleep(0.2)  # two writers racing for a free lock: the later write wins, the other sees it
        info = json.loads(self.folder.read(LOCK_NAME))
        if info.get("token") != self.owner["token"]:
            raise OutputLockedError(f"{self.folder.url} was just taken by another beit-jax extract "
                                    f"({self._describe(info)}); use another `output_dir`")
        self._thread = threading.Thread(target=self._heartbeat, daemon=True, name="beit-jax-lock")
        self._thread.start()

    def _write_remote(self) -> None:
        now = time.time()
        self.folder.write(LOCK_NAME, json.dumps(dict(self.owner, since=getattr(self, "_since", now),
                                                     heartbeat=now)).encode())
        self._since = getattr(self, "_since", now)

    def _heartbeat(self) -> None:
        while not self._stop.wait(LOCK_HEARTBEAT_S):
            try:
                self._write_remote()
            except Exception:  # noqa: BLE001 - a missed heartbeat only lets the lock age
                pass

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # drops the flock; the file stays (harmless, and ours to reuse)
            self._fd = None
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5)
            self._thread = None
            try:
                info = json.loads(self.folder.read(LOCK_NAME))
                if info.get("token") == self.owner["token"]:
                    self.folder.fs.rm_file(self.folder.path(LOCK_NAME))
            except (ValueError, OSError):
                pass

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

