"""Torch-side tools: timm <-> beit-jax checkpoint conversion and verification (needs torch + timm)."""
