"""Fixtures: the real images in ../shared, and a 10-class timm checkpoint (helpers the tests call
live in tests/support.py)."""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from beit_jax import checkpoints
from tests.support import (IMAGENET_SAMPLE, ODD_IMAGES, S3_ENV, TINY, free_port, shared_dir, start_server, timm_model,
                           timm_state_dict)


# JAX's persistent compilation cache, in a folder made fresh for each test run and shared by the xdist
# workers and every process the tests start (CLI runs, helpers): many tests compile the same tiny-model
# programs, in-process and in subprocesses. Compiled programs are what a cold compile gives, so no
# result can differ; each run starts empty (no state carried between runs). JAX's own variables, as a
# user would set them; with a size limit JAX guards every entry with a file lock (concurrent writers).
_XLA_CACHE = pytest.StashKey[str]()
XLA_CACHE_OPTIONS = {"jax_persistent_cache_min_compile_time_secs": 0, "jax_compilation_cache_max_size": 8 << 30}
XLA_CACHE_VARS = [k.upper() for k in ("jax_compilation_cache_dir", *XLA_CACHE_OPTIONS)]  # how JAX reads them


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):  # a worker: the controller made the folder
        return
    cache = tempfile.mkdtemp(prefix="beit-jax-tests-xla-")
    config.stash[_XLA_CACHE] = cache
    import jax  # imported already (by this file): its config read the variables before they were set

    for option, value in dict(XLA_CACHE_OPTIONS, jax_compilation_cache_dir=cache).items():
        os.environ[option.upper()] = str(value)  # for the workers and the processes tests start
        jax.config.update(option, value)  # for this process


def pytest_unconfigure(config):
    cache = config.stash.get(_XLA_CACHE, None)
    if cache:
        shutil.rmtree(cache, ignore_errors=True)


@pytest.fixture(scope="session")
def imagenet_dir() -> Path:
    return shared_dir(IMAGENET_SAMPLE)


@pytest.fixture(scope="session")
def odd_dir() -> Path:
    return shared_dir(ODD_IMAGES)


@pytest.fixture(scope="session")
def ft10(tmp_path_factory):
    """A timm checkpoint fine-tuned to 10 classes (perturbed random weights)."""
    tm = timm_model(TINY, num_classes=10)
    path = tmp_path_factory.mktemp("ft10") / "ft10.safetensors"
    checkpoints.save_safetensors(timm_state_dict(tm), path)
    return tm, path


@pytest.fixture(scope="session")
def s3_env(tmp_path_factory):
    """moto's S3 server on loopback; the environment an S3 user sets (endpoint and credentials)."""
    port = free_port()
    exe = Path(sys.executable).parent / "moto_server"
    proc = start_server([str(exe), "-H", "127.0.0.1", "-p", str(port)], port,
                        tmp_path_factory.mktemp("moto") / "server.log")
    env = dict(S3_ENV, AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="session")
def s3fs_client(s3_env):
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    return fs
