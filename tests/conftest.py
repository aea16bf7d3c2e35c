"""Fixtures: the real images in ../shared, and a 10-class timm checkpoint (helpers the tests call
live in tests/support.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from beit_jax import checkpoints
from tests.support import IMAGENET_SAMPLE, ODD_IMAGES, TINY, shared_dir, timm_model, timm_state_dict


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
