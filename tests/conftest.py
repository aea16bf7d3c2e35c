"""Fixtures: the real images in ../shared (helpers the tests call live in tests/support.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import IMAGENET_SAMPLE, ODD_IMAGES, shared_dir


@pytest.fixture(scope="session")
def imagenet_dir() -> Path:
    return shared_dir(IMAGENET_SAMPLE)


@pytest.fixture(scope="session")
def odd_dir() -> Path:
    return shared_dir(ODD_IMAGES)
