"""Shared fixtures: the real reference (timm), real images from ../shared, perturbed random weights."""
from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("BEIT_JAX_SHARED", ROOT.parent / "shared"))
IMAGENET_SAMPLE = SHARED / "data" / "imagenet-sample"
ODD_IMAGES = SHARED / "data" / "odd-images"


def shared_dir(path: Path) -> Path:
    """The shared data folder, or skip (fail under CI=true, where it must be present)."""
    if not path.is_dir():
        msg = f"{path} not found: the shared test images live beside the checkout (../shared)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg + " and CI=true requires them")
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def imagenet_dir() -> Path:
    return shared_dir(IMAGENET_SAMPLE)


@pytest.fixture(scope="session")
def odd_dir() -> Path:
    return shared_dir(ODD_IMAGES)


def perturb_(model, seed: int = 0):
    """Make a random-init timm model's weights non-trivial: no zero biases, no unit norms.

    timm inits biases, q/v biases and relative position tables to zero and norm weights to one,
    which would hide a swapped or dropped mapping. Position tables get a large perturbation so a
    wrong index or resize shows in the logits.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.5 if "relative_position_bias_table" in name else 0.02
            if name.endswith(("q_bias", "v_bias")):
                scale = 0.1
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


@functools.lru_cache(maxsize=4)
def _timm_model_cached(name: str, kwargs_items: tuple, seed: int):
    import timm

    model = timm.create_model(name, pretrained=False, **dict(kwargs_items)).eval()
    return perturb_(model, seed)


def timm_model(name: str, seed: int = 0, **kwargs):
    """A perturbed random-init timm model (cached: treat as read-only)."""
    return _timm_model_cached(name, tuple(sorted(kwargs.items())), seed)


def timm_state_dict(model) -> dict:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def to_nchw(x: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def random_images(batch: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randn(batch, size, size, 3).astype(np.float32)


def max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
