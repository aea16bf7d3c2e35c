"""Elastic extraction: any number of independent workers, started and killed at any time by any
launcher, sharing nothing but the output folder (no coordinator, no collectives).

A worker claims a unit of work by creating `OUT/claims/<unit>-<attempt>.json` with a create-if-absent
write (`Folder.create`: a hard link locally, a conditional PUT on S3 / GCS), so exactly one worker
holds each attempt. While it works it rewrites its claims every `lease_s / 4` seconds. A claim
whose object has not changed for `lease_s`, as timed by the observer's own clock (no clock is
compared across machines), is expired: any worker may then take the unit over by creating the
next attempt. A worker stopped by a signal (a spot VM's notice) releases its unfinished claims
(`<unit>-<attempt>.released`), so others take them over at once.

Parts of attempt k of a unit are named with k (see `sinks.stem`), and the unit's marker is
created create-if-absent too: if two workers did the same unit, the first marker wins, the loser
removes what it wrote, and the marker lists only the winner's files, which is all readers read.
The worker that sees every unit finished finalises (`Manifest.finalize`, idempotent).
"""
from __future__ import annotations

import json
import os
import random
import socket
import threading
import time
import uuid
from typing import Dict, Iterator, List, Optional, Sequence, Set, Tuple

from .storage import Folder

CLAIMS = "claims"
RELEASED = ".released"


def claim_name(unit: int, attempt: int) -> str:
    return f"{unit:07d}-{attempt:04d}.json"


def _parse(name: str) -> Optional[Tuple[int, int, bool]]:
    """(unit, attempt, released) of a claims/ entry, None for anything else (temp files)."""
    released = name.endswith(RELEASED)
    base = name[:-len(RELEASED)] if released else name
    if not base.endswith(".json") or base.startswith("."):
        return None
    try:
        unit, attempt = base[:-5].split("-")
        return int(unit), int(attempt), released
    except ValueError:
        return None


class View:
    """What one scan of the folder saw: finished units, and each unit's latest claim."""

    def __init__(self, finished: Set[int], latest: Dict[int, Tuple[int, bool, tuple]], attempts: Dict[int, int]):
        self.finished, self.latest, self.attempts = finished, latest, attempts


class Leases:
    """This worker's claims on units of one output folder (see the module docstring)."""

    def __init__(self, folder: Folder, lease_s: float, units_folder: str = "units"):
        if lease_s <= 0:
            raise ValueError(f"lease_seconds must be positive (got {lease_s!r})")
        self.folder, self.lease_s, self.units_folder = folder, float(lease_s), units_folder
        self.worker = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.held: Dict[int, int] = {}  # unit -> attempt, claimed and not yet finished or released
        self.lost: Set[int] = set()  # units of ours another worker took over (our lease lapsed)
        self._beats = 0
        self._seen: Dict[str, Tuple[tuple, float]] = {}  # claim -> (its (size, version), first seen unchanged)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.renew_errors = 0

    # ---- scanning --------------------------------------------------------------------------------
    def scan(self) -> View:
        """One listing of units/ and one of claims/."""
        finished = set()
        for name in self.folder.stats(self.units_folder):
            if name.endswith(".json") and not name.startswith("."):
                try:
                    finished.add(int(name[:-5]))
                except ValueError:
                    pass
        now = time.monotonic()
        claims = self.folder.stats(CLAIMS)
        latest: Dict[int, Tuple[int, bool, tuple]] = {}
        released = {(u, a) for u, a, r in filter(None, map(_parse, claims)) if r}
        for name, stat in claims.items():
            parsed = _parse(name)
            if parsed is None or parsed[2]:
                continue
            unit, attempt, _ = parsed
            seen = self._seen.get(name)
            if seen is None or seen[0] != stat:
                self._seen[name] = (stat, now)
            if unit not in latest or attempt > latest[unit][0]:
                latest[unit] = (attempt, (unit, attempt) in released, stat)
        attempts = {}
        for name in claims:
            parsed = _parse(name)
            if parsed and not parsed[2]:
                attempts[parsed[0]] = attempts.get(parsed[0], 0) + 1
        with self._lock:  # ours, superseded by a newer attempt: lost
            for unit, attempt in list(self.held.items()):
                if unit in latest and latest[unit][0] > attempt:
                    self.lost.add(unit)
        return View(finished, latest, attempts)

    def expired(self, view: View, unit: int) -> bool:
        attempt, released, _ = view.latest[unit]
        if released:
            return True
        with self._lock:
            if self.held.get(unit) == attempt:
                return False
        seen = self._seen.get(claim_name(unit, attempt))
        return seen is not None and time.monotonic() - seen[1] > self.lease_s

    def candidates(self, view: View, units: Sequence[int]) -> List[Tuple[int, int]]:
        """(unit, attempt to claim) of every unit not finished whose claim is absent or expired,
        starting at a random place so that workers started together spread out."""
        free = []
        for u in units:
            if u in view.finished:
                continue
            if u not in view.latest:
                free.append((u, 0))
            elif self.expired(view, u):
                free.append((u, view.latest[u][0] + 1))
        if free:
            k = random.randrange(len(free))
            free = free[k:] + free[:k]
        return free

    # ---- claiming --------------------------------------------------------------------------------
    def _content(self, unit: int, attempt: int) -> bytes:
        self._beats += 1
        return json.dumps({"unit": unit, "attempt": attempt, "worker": self.worker, "beat": self._beats,
                           "time": time.time(), "lease_seconds": self.lease_s}).encode()

    def claim(self, unit: int, attempt: int) -> bool:
        if not self.folder.create(f"{CLAIMS}/{claim_name(unit, attempt)}", self._content(unit, attempt)):
            return False
        with self._lock:
            self.held[unit] = attempt
        return True

    def attempt(self, unit: int) -> int:
        with self._lock:
            return self.held.get(unit, 0)

    def is_lost(self, unit: int) -> bool:
        with self._lock:
            return unit in self.lost

    def done(self, unit: int) -> None:
        """The unit is finished (or lost): stop renewing its claim."""
        with self._lock:
            self.held.pop(unit, None)
            self.lost.discard(unit)

    def release_all(self) -> List[int]:
        """Hand back every unfinished claim at once (the worker is stopping): others take them
        over without waiting for the lease to expire."""
        with self._lock:
            held, self.held = dict(self.held), {}
        for unit, attempt in held.items():
            try:
                self.folder.write(f"{CLAIMS}/{claim_name(unit, attempt)}{RELEASED}", self.worker.encode())
            except OSError:
                pass  # the lease expires instead
        return sorted(held)

    # ---- renewing --------------------------------------------------------------------------------
    def _renew_once(self) -> None:
        with self._lock:
            held = dict(self.held)
        for unit, attempt in held.items():
            try:
                self.folder.write(f"{CLAIMS}/{claim_name(unit, attempt)}", self._content(unit, attempt))
            except OSError:
                self.renew_errors += 1  # a lapse lets another worker take the unit; its marker decides

    def start(self) -> "Leases":
        def loop():
            while not self._stop.wait(self.lease_s / 4):
                self._renew_once()

        self._thread = threading.Thread(target=loop, daemon=True, name="beit-jax-leases")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None


def claimed_units(leases: Leases, view: View, units: Sequence[int], on_claim) -> Iterator[int]:
    """Claim candidates one at a time as the pipeline asks for the next unit (so a worker holds
    only the units it is about to read); a unit another worker claimed first is skipped."""
    for unit, attempt in leases.candidates(view, units):
        if leases.claim(unit, attempt):
            on_claim(unit)
            yield unit
