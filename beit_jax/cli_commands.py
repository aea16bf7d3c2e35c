"""Sub-commands of `beit-jax` beyond classify (each registers its own parser)."""
REGISTRARS = []
