"""`beit-jax convert`: the same tool as `python -m beit_jax.conversion.timm_to_flax`."""
from __future__ import annotations

import argparse


def register(sub) -> None:
    from ..conversion import timm_to_flax

    p = sub.add_parser("convert", help="timm checkpoint -> beit-jax checkpoint (+ --verify against timm)",
                       description=timm_to_flax.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    timm_to_flax.add_arguments(p)
    p.set_defaults(run=timm_to_flax.run)
