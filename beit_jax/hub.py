"""Pretrained weights from the Hugging Face Hub (timm's repos), through huggingface_hub's cache.

Fourth stage of the loading stack, beside `checkpoints.py`: HF_HOME / HF_HUB_CACHE and
HF_HUB_OFFLINE apply exactly as for timm itself.
"""
from __future__ import annotations

from .models import PretrainedCfg


class PretrainedUnavailableError(RuntimeError):
    """Pretrained weights are neither reachable on the Hub nor in the local cache."""


def download_pretrained(cfg: PretrainedCfg, filename: str = "model.safetensors") -> str:
    """Path of the tag's timm weights in the HF cache, downloading them if needed."""
    if not cfg.has_weights:
        raise PretrainedUnavailableError(
            f"{cfg.name} has no published weights (timm lists it untrained); create it with "
            f"pretrained=False, or pass `checkpoint_path=FILE`")
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_id=cfg.hf_hub_id, filename=filename)
    except Exception as e:
        raise PretrainedUnavailableError(
            f"could not get {filename} of {cfg.hf_hub_id} from the Hugging Face Hub or its cache "
            f"({type(e).__name__}: {e}). Either connect to the Hub once (the file is then cached "
            f"under HF_HOME), copy a timm checkpoint here and pass "
            f"`checkpoint_path=FILE`, or point HF_HOME/HF_HUB_CACHE at a cache that holds it.") from e
