"""Data parallelism over every device of every process: `jax.pmap` and `jax.jit` + NamedSharding.

Both paths run the same per-device function on a fixed global batch; each process feeds its own
rows (`local_batch = global_batch / process_count`) and gets its own rows back, so host code is
identical for one device, one host, or a pod. Parameters are placed on the devices once.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .model import chunked

MODES = ("sharded", "pmap")
DATA_AXIS = "data"


def init_distributed(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
                     process_id: Optional[int] = None, cpu_collectives: Optional[str] = None) -> None:
    """`jax.distributed.initialize`, once, before any device is touched.

    With no arguments JAX detects the cluster (TPU pods, SLURM, ...). On CPU hosts (tests) pass
    cpu_collectives='gloo' so cross-process collectives work.
    """
    if cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    kwargs = {}
    if coordinator is not None:
        kwargs = dict(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    jax.distributed.initialize(**kwargs)


class DataParallel:
    """Run `fn(variables, batch) -> pytree of (B, ...) arrays` data-parallel.

    mode 'sharded': one `jax.jit` program over a 1-D Mesh of all devices (all processes), inputs
    assembled with `jax.make_array_from_process_local_data` (JAX's recommended path, scales to
    many hosts). mode 'pmap': `jax.pmap` over this process's devices (the classic path; since
    JAX 0.8 it is itself built on jit + shard_map).
    """

    def __init__(self, fn: Callable, mode: str = "sharded", donate_inputs: bool = True,
                 micro_batch: Optional[int] = None):
        if mode not in MODES:
            raise ValueError(f"parallel mode must be one of {MODES} (got {mode!r})")
        if micro_batch and (mode == "pmap" or jax.device_count() == 1):
            # per-device chunks (see model.chunked); a sharded multi-device batch is left whole so
            # XLA keeps partitioning it along the batch axis.
            fn = chunked(fn, micro_batch)
        self.fn, self.mode = fn, mode
        self.traces = 0

        def traced(variables, batch):
            self.traces += 1  # runs at trace time only: counts compilations, not calls
            return fn(variables, batch)
        self.local_devices = jax.local_devices()
        self.num_local_devices = len(self.local_devices)
        self.num_devices = jax.device_count()
        self.process_index, self.process_count = jax.process_index(), jax.process_count()
        # CPU cannot reuse donated buffers (and warns each call): donate on accelerators only.
        donate = (1,) if donate_inputs and jax.default_backend() != "cpu" else ()
        if mode == "sharded":
            self.mesh = Mesh(np.asarray(jax.devices()), (DATA_AXIS,))
            self.replicated = NamedSharding(self.mesh, P())
            self.batch_sharding = NamedSharding(self.mesh, P(DATA_AXIS))
            self._step = jax.jit(traced, in_shardings=(self.replicated, self.batch_sharding),
                                 out_shardings=self.batch_sharding, donate_argnums=donate)
        else:
            self._step = jax.pmap(traced, in_axes=(0, 0), donate_argnums=donate)
            # Leading axis over this process's devices: what pmap expects for its mapped inputs.
            self.local_sharding = NamedSharding(Mesh(np.asarray(self.local_devices), ("local",)), P("local"))

    def local_batch_size(self, global_batch: int) -> int:
        """Rows this process feeds per step; checks the global batch splits over all devices."""
        if global_batch % self.num_devices:
            raise ValueError(f"global batch size {global_batch} must be a multiple of the device count "
                             f"({self.num_devices}); e.g. {self.num_devices * max(1, global_batch // self.num_devices)}")
        return global_batch // self.process_count

    def replicate(self, variables: Any) -> Any:
        """Place one copy of the parameters on every device (done once, not per batch)."""
        variables = jax.tree_util.tree_map(np.asarray, variables)
        if self.mode == "pmap":
            n = self.num_local_devices
            return jax.tree_util.tree_map(
                lambda a: jax.device_put(np.broadcast_to(a[None], (n, *a.shape)), self.local_sharding), variables)
        return jax.tree_util.tree_map(
            lambda a: jax.make_array_from_callback(a.shape, self.replicated, lambda idx: a[idx]), variables)

    def put_batch(self, local_batch: np.ndarray) -> jax.Array:
        """This process's rows (local_batch, ...) -> the device-side input of one step."""
        if self.mode == "pmap":
            n = self.num_local_devices
            return jax.device_put(local_batch.reshape(n, -1, *local_batch.shape[1:]), self.local_sharding)
        return jax.make_array_from_process_local_data(self.batch_sharding, local_batch)

    def __call__(self, replicated_variables: Any, device_batch: jax.Array) -> Any:
        """Dispatch one step (asynchronous); `fetch` turns the result into this process's rows."""
        return self._step(replicated_variables, device_batch)

    def fetch(self, outputs: Any) -> Any:
        """Device outputs -> numpy rows of this process, in the order they were fed."""
        if self.mode == "pmap":
            return jax.tree_util.tree_map(lambda a: np.asarray(a).reshape(-1, *a.shape[2:]), outputs)
        return jax.tree_util.tree_map(_local_rows, outputs)

    def cache_size(self) -> int:
        """Programs traced (and compiled) so far: stays 1 for a fixed batch shape."""
        return self.traces


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


def sync(name: str) -> None:
    """Barrier across processes (no-op with one)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
