"""Sub-commands of `beit-jax` beyond classify; each registers its own parser."""
from __future__ import annotations

import argparse


def _register_convert(sub) -> None:
    p = sub.add_parser("convert", help="timm checkpoint -> beit-jax checkpoint (same as python -m conversion.timm_to_flax)",
                       add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)

    def run(args):
        from conversion.timm_to_flax import main
        return main(args.rest)

    p.set_defaults(func=run)


REGISTRARS = [_register_convert]
