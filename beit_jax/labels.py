"""ImageNet-1k / 22k class names (synsets and WordNet lemmas from timm's data files, Apache-2.0)."""
from __future__ import annotations

import functools
from importlib import resources
from typing import List, Optional

_SUBSETS = {1000: "imagenet1k_synsets.txt", 21841: "imagenet22k_synsets.txt"}


def _read(name: str) -> List[str]:
    return resources.files("beit_jax").joinpath("data", name).read_text().splitlines()


@functools.lru_cache(maxsize=None)
def _lemmas() -> dict:
    return dict(line.split("\t", 1) for line in _read("imagenet_synset_to_lemma.txt") if "\t" in line)


@functools.lru_cache(maxsize=None)
def class_names(num_classes: int) -> Optional[List[str]]:
    """Readable names ('tench, Tinca tinca') for a 1000- or 21841-class head, else None."""
    if num_classes not in _SUBSETS:
        return None
    lemmas = _lemmas()
    return [lemmas.get(s, s) for s in _read(_SUBSETS[num_classes])]


@functools.lru_cache(maxsize=None)
def synsets(num_classes: int) -> Optional[List[str]]:
    return _read(_SUBSETS[num_classes]) if num_classes in _SUBSETS else None
