"""Data parallelism over every device of every process, for inference and training.

The only place that builds a mesh, replicates parameters, places batches and reads rows back.
Two modes run the same per-device function on a fixed global batch: 'sharded' (one `jax.jit`
program over a 1-D Mesh of all devices of all processes, the default) and 'pmap' (`jax.pmap` over
this process's devices; since JAX 0.8 built on jit + shard_map). Each process feeds its own rows
(`global_batch / process_count`) and gets its own rows back, so host code is the same for one
device, one host or a pod. `inference_defaults` is the one policy for what inference runs with
when the user leaves it open (dtype, batch size, donation, a hint when the batch is too small).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .layers import backend_platform

MODES = ("sharded", "pmap")
DATA_AXIS = "data"


def init_distributed(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
                     process_id: Optional[int] = None, cpu_collectives: Optional[str] = None,
                     host_timeout_s: Optional[float] = None) -> None:
    """`jax.distributed.initialize`, once, before any device is touched, and a HostWatch.

    With no arguments JAX detects the cluster (TPU pods, SLURM, ...). On CPU hosts (tests) pass
    cpu_collectives='gloo' so cross-process collectives work. host_timeout_s: how long a silent
    process may go before the others stop (HostWatch; default 30 s).
    """
    if cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    kwargs = {}
    if coordinator is not None:
        kwargs = dict(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    jax.distributed.initialize(**kwargs)
    if jax.process_count() > 1:
        HostWatch.start(host_timeout_s)


def shutdown_distributed() -> None:
    """Leave jax.distributed at the end of a command. The watch beats on until every process has
    reached the shutdown barrier (a peer that died instead is still reported), then stops."""
    try:
        jax.distributed.shutdown()
    finally:
        HostWatch.stop()


EXIT_HOST_LOST = 75  # EX_TEMPFAIL: the run can continue once every host is back (--resume)


class HostWatch:
    """Each process of a multi-host run heartbeats through the jax.distributed key-value store and
    watches the others'. When one falls silent for `timeout_s` (below JAX's own heartbeat timeout
    of 100 s, after which the runtime aborts with a C++ stack trace), or the coordinator cannot be
    reached, this process prints one line naming the lost
    process and what to do, and exits EXIT_HOST_LOST at once: lockstep work cannot go on without
    it, and leaving jax.distributed would wait for it. Finished units are kept (their markers are
    written), so `--resume` with every host continues."""

    timeout_s = 30.0
    beat_s = 1.0
    _thread = None
    _stopping = None

    @classmethod
    def start(cls, timeout_s: Optional[float] = None) -> None:
        import threading

        if cls._thread is not None:
            return
        cls.timeout_s = float(timeout_s or HostWatch.timeout_s)
        cls._stopping = threading.Event()
        cls._thread = threading.Thread(target=cls._watch, args=(cls._stopping,), daemon=True,
                                       name="beit-jax-hostwatch")
        cls._thread.start()

    @classmethod
    def stop(cls) -> None:
        if cls._thread is None:
            return
        cls._stopping.set()
        cls._thread.join(timeout=10)
        cls._thread = None

    @classmethod
    def _watch(cls, stopping) -> None:
        import time

        from jax._src import distributed

        client = distributed.global_state.client
        me, n = jax.process_index(), jax.process_count()
        last = {i: (None, time.monotonic()) for i in range(n) if i != me}
        beat, unreachable_since = 0, None

        def get(key):
            try:
                return client.key_value_try_get(key)
            except Exception:  # noqa: BLE001 - not set
                return None

        while not stopping.wait(cls.beat_s):
            now = time.monotonic()
            try:
                beat += 1
                client.key_value_set(f"beit-jax/alive/{me}", str(beat), allow_overwrite=True)
                unreachable_since = None
            except Exception as e:  # noqa: BLE001 - the coordination service is gone
                unreachable_since = unreachable_since or now
                if now - unreachable_since > min(cls.timeout_s, 10.0) and not stopping.is_set():
                    cls._lost(f"the coordinator (process 0) cannot be reached ({type(e).__name__})", n)
                continue
            for i in list(last):
                value = get(f"beit-jax/alive/{i}")
                if value != last[i][0]:
                    last[i] = (value, now)
                elif now - last[i][1] > cls.timeout_s and not stopping.is_set():
                    cls._lost(f"process {i} of {n} sent no heartbeat for {cls.timeout_s:.0f}s (killed, preempted, "
                              f"or its host went down)", n)

    @staticmethod
    def _lost(why: str, n: int) -> None:
        import os
        import sys

        print(f"beit-jax: lost a host: {why}. This process stops too: a multi-host run steps in lockstep. "
              f"Finished work is kept: start all {n} processes again with --resume (for extraction on "
              f"preemptible machines, run independent --elastic workers instead).", file=sys.stderr, flush=True)
        os._exit(EXIT_HOST_LOST)


# ---- defaults for inference on this machine ------------------------------------------------------
ACCELERATOR_BATCH_PER_DEVICE = 256  # images per GPU/TPU device by default: enough to keep one busy
SMALL_BATCH_PER_DEVICE = 64  # fewer per accelerator device than this: print a hint
CPU_BATCH = 64  # global default on CPU hosts (the model micro-batches it, see Beit.micro_batch_rows)


@dataclasses.dataclass(frozen=True)
class InferenceDefaults:
    """What inference runs with on this machine when the user leaves a choice open.

    dtype: 'bfloat16' on accelerators (GPU/TPU), 'float32' on CPU, unless chosen;
    batch_size: ACCELERATOR_BATCH_PER_DEVICE per accelerator device, CPU_BATCH on CPU (rounded up
    to a multiple of the device count), unless chosen; donate: whether input batches are donated
    (accelerators; XLA:CPU cannot reuse them); hint: one line when the batch is too small to keep
    the devices busy. Micro-batching is the model's own choice (`Beit.micro_batch`: CPU only).
    """
    platform: str
    num_devices: int
    dtype: str
    dtype_is_default: bool
    batch_size: int
    batch_size_is_default: bool
    donate: bool
    hint: Optional[str]

    @property
    def accelerator(self) -> bool:
        return self.platform != "cpu"

    def dtype_note(self) -> str:
        """'bfloat16 (default on cuda; `dtype=float32` for full precision)', or just the dtype when chosen."""
        if not self.dtype_is_default or not self.accelerator:
            return self.dtype
        return f"{self.dtype} (default on {self.platform}; `dtype=float32` for full precision)"


def inference_defaults(dtype: Optional[str] = None, batch_size: Optional[int] = None, *,
                       platform: Optional[str] = None, num_devices: Optional[int] = None) -> InferenceDefaults:
    """The inference policy (see InferenceDefaults) for a dtype / global batch the user chose or left
    None. platform/num_devices default to this process's JAX backend and global device count."""
    platform = platform or backend_platform()
    num_devices = num_devices or jax.device_count()
    accelerator = platform != "cpu"
    chosen_batch = batch_size
    if batch_size is None:
        batch_size = (ACCELERATOR_BATCH_PER_DEVICE * num_devices if accelerator
                      else num_devices * math.ceil(CPU_BATCH / num_devices))
    hint = None
    if accelerator and batch_size < SMALL_BATCH_PER_DEVICE * num_devices:
        full = ACCELERATOR_BATCH_PER_DEVICE * num_devices
        hint = (f"hint: batch {batch_size} is {batch_size / num_devices:g} images per device on {num_devices} "
                f"{platform} device(s), too few to keep them busy; `batch_size={full}` "
                f"({ACCELERATOR_BATCH_PER_DEVICE} per device) is the default")
    return InferenceDefaults(platform=platform, num_devices=num_devices,
                             dtype=dtype or ("bfloat16" if accelerator else "float32"), dtype_is_default=dtype is None,
                             batch_size=batch_size, batch_size_is_default=chosen_batch is None,
                             donate=accelerator, hint=hint)


class Step:
    """A compiled data-parallel step: call it like the function; `traces` counts compilations."""

    def __init__(self, fn: Callable, compile: Callable[[Callable], Callable]):
        self.traces = 0

        def traced(*args):
            self.traces += 1  # runs at trace time only: counts compilations, not calls
            return fn(*args)

        self._compiled = compile(traced)

    def __call__(self, *args):
        return self._compiled(*args)


class DataParallel:
    """Device layout for data parallelism: mesh, parameter replication, batch placement, read-back."""

    def __init__(self, mode: str = "sharded"):
        if mode not in MODES:
            raise ValueError(f"parallel mode must be one of {MODES} (got {mode!r})")
        self.mode = mode
        self.local_devices = jax.local_devices()
        self.num_local_devices = len(self.local_devices)
        self.num_devices = jax.device_count()
        self.process_index, self.process_count = jax.process_index(), jax.process_count()
        self.mesh = Mesh(np.asarray(jax.devices()), (DATA_AXIS,))
        self.replicated = NamedSharding(self.mesh, P())
        self.batch_sharding = NamedSharding(self.mesh, P(DATA_AXIS))
        # pmap's mapped inputs: a leading axis over this process's devices.
        self.local_sharding = NamedSharding(Mesh(np.asarray(self.local_devices), ("local",)), P("local"))

    # ---- host <-> device ------------------------------------------------------------------------
    def local_batch_size(self, global_batch: int) -> int:
        """Rows this process feeds per step; checks the global batch splits over all devices."""
        if global_batch % self.num_devices:
            raise ValueError(f"global batch size {global_batch} must be a multiple of the device count "
                             f"({self.num_devices}); e.g. {self.num_devices * max(1, global_batch // self.num_devices)}")
        return global_batch // self.process_count

    def process_rows(self, global_batch: int) -> slice:
        """The rows of a global batch that this process feeds (`put_batch`), as the mesh lays them
        out: each process decodes only these rows of every global batch."""
        self.local_batch_size(global_batch)
        if self.mode == "pmap":
            start = self.process_index * (global_batch // self.process_count)
            return slice(start, start + global_batch // self.process_count)
        spans = sorted({(idx[0].start or 0, idx[0].stop if idx[0].stop is not None else global_batch)
                        for idx in self.batch_sharding.addressable_devices_indices_map((global_batch,)).values()})
        start, stop = spans[0][0], spans[-1][1]
        if sum(b - a for a, b in spans) != stop - start:
            raise RuntimeError(f"process {self.process_index}'s devices hold rows {spans} of the global batch, "
                               f"not one contiguous block")
        return slice(start, stop)

    def replicate(self, tree: Any) -> Any:
        """Place one copy of a pytree (parameters, train state) on every device, once."""
        tree = jax.tree_util.tree_map(np.asarray, tree)
        if self.mode == "pmap":
            n = self.num_local_devices
            return jax.tree_util.tree_map(
                lambda a: jax.device_put(np.broadcast_to(a[None], (n, *a.shape)), self.local_sharding), tree)
        return jax.tree_util.tree_map(
            lambda a: jax.make_array_from_callback(a.shape, self.replicated, lambda idx: a[idx]), tree)

    def put_batch(self, *local_rows: np.ndarray):
        """This process's rows (local_batch, ...) -> device-side inputs of one step (one per array)."""
        out = []
        for rows in local_rows:
            rows = np.asarray(rows)
            if self.mode == "pmap":
                n = self.num_local_devices
                out.append(jax.device_put(rows.reshape(n, -1, *rows.shape[1:]), self.local_sharding))
            else:
                out.append(jax.make_array_from_process_local_data(self.batch_sharding, rows))
        return out[0] if len(out) == 1 else tuple(out)

    def fetch(self, outputs: Any) -> Any:
        """Batch-sharded device outputs -> numpy rows of this process, in the order they were fed."""
        if self.mode == "pmap":
            return jax.tree_util.tree_map(lambda a: np.asarray(a).reshape(-1, *a.shape[2:]), outputs)
        return jax.tree_util.tree_map(_local_rows, outputs)

    # ---- compiled steps -------------------------------------------------------------------------
    def inference_step(self, fn: Callable, donate: Optional[bool] = None) -> Step:
        """`fn(variables, batch) -> pytree of (B, ...) rows` over all devices; call it with
        `replicate`d variables and a `put_batch`ed batch, read rows with `fetch`.

        donate: give the batch's device buffers to the step (default: on accelerators only; XLA:CPU
        cannot reuse them and warns each call). Micro-batching, where it pays, is the model's
        (`Beit.micro_batch`), so fn is the plain forward.
        """
        if donate is None:
            donate = inference_defaults().donate
        donate_argnums = (1,) if donate else ()
        if self.mode == "pmap":
            return Step(fn, lambda f: jax.pmap(f, in_axes=(0, 0), donate_argnums=donate_argnums))
        return Step(fn, lambda f: jax.jit(f, in_shardings=(self.replicated, self.batch_sharding),
                                          out_shardings=self.batch_sharding, donate_argnums=donate_argnums))

    def train_step(self, fn: Callable, num_batch_args: int, num_replicated_args: int = 0) -> Step:
        """`fn(state, *batch, *rest) -> (state, metrics)`: state replicated (and donated), the
        `num_batch_args` batch arrays split over the mesh, then `num_replicated_args` replicated
        inputs (per-step values such as a mixup lambda: `replicate` them), metrics replicated."""
        self._require_sharded("training")
        in_shardings = (self.replicated,) + (self.batch_sharding,) * num_batch_args + (self.replicated,) * num_replicated_args
        return Step(fn, lambda f: jax.jit(f, in_shardings=in_shardings,
                                          out_shardings=(self.replicated, self.replicated), donate_argnums=(0,)))

    def reduce_step(self, fn: Callable, num_batch_args: int) -> Step:
        """`fn(params, *batch) -> replicated sums` (evaluation)."""
        self._require_sharded("evaluation")
        return Step(fn, lambda f: jax.jit(f, in_shardings=(self.replicated,) + (self.batch_sharding,) * num_batch_args,
                                          out_shardings=self.replicated))

    def _require_sharded(self, what: str) -> None:
        if self.mode != "sharded":
            raise ValueError(f"{what} runs in 'sharded' mode only (got {self.mode!r})")


def _local_rows(arr: jax.Array) -> np.ndarray:
    shards = sorted(arr.addressable_shards, key=lambda s: s.index[0].start or 0)
    return np.concatenate([np.asarray(s.data) for s in shards], axis=0)


def all_processes_agree(flags: np.ndarray) -> np.ndarray:
    """Element-wise AND of a boolean vector over all processes (identity with one process)."""
    if jax.process_count() == 1:
        return flags
    from jax.experimental import multihost_utils

    gathered = multihost_utils.process_allgather(np.asarray(flags, np.int32))
    return np.all(np.asarray(gathered).reshape(jax.process_count(), -1) > 0, axis=0)


def any_process(flag: bool) -> bool:
    """True if `flag` is true on any process (identity with one)."""
    if jax.process_count() == 1:
        return bool(flag)
    return not bool(all_processes_agree(np.array([not flag]))[0])


def gather_rows(x: np.ndarray) -> np.ndarray:
    """Every process's rows of `x` concatenated in process order (identity with one process);
    every process must pass the same shape."""
    if jax.process_count() == 1:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    gathered = np.asarray(multihost_utils.process_allgather(np.asarray(x)))
    return gathered.reshape(-1, *np.shape(x)[1:])


def broadcast_from_process_0(tree: Any) -> Any:
    """Process 0's copy of a pytree of host arrays, on every process (identity with one): what
    process 0 read from disk (a checkpoint on resume) becomes everyone's."""
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils

    return jax.tree_util.tree_map(np.asarray, multihost_utils.broadcast_one_to_all(tree))


def sync(name: str) -> None:
    """Barrier across processes (no-op with one)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
