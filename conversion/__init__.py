"""Torch-side tools: timm checkpoints -> beit-jax exports and back, with verification against timm.

This folder sits at the top of the checkout, outside the JAX library, and is installed as
`beit_jax.conversion` (pyproject's package-dir): from a checkout run `python -m
conversion.timm_to_flax` / `python -m conversion.flax_to_timm`; installed, `beit-jax convert` or
`python -m beit_jax.conversion.timm_to_flax`. The modules import torch/timm inside the functions
that need them; `import beit_jax` never imports this package.
"""
