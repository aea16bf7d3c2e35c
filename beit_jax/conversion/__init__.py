"""Torch-side tools: timm checkpoints -> beit-jax exports and back, with verification against timm.

Run as `python -m beit_jax.conversion.timm_to_flax` / `python -m beit_jax.conversion.flax_to_timm`
(or `beit-jax convert`). These modules import torch/timm inside the functions that need them;
`import beit_jax` never imports this package.
"""
