"""Fixtures: the real images in ../shared, and a 10-class timm checkpoint (helpers the tests call
live in tests/support.py)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from beit_jax import checkpoints
from tests.support import (IMAGENET_SAMPLE, ODD_IMAGES, S3_ENV, TINY, free_port, shared_dir, start_server, timm_model,
                           timm_state_dict)


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
