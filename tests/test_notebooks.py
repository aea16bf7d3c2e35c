"""Every notebook runs top to bottom headless (offline: labelled random weights) and draws its figures."""
from __future__ import annotations


import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import XLA_CACHE_VARS
from tests.support import ROOT

NOTEBOOKS = {  # notebook -> figures it must produce
    "01_quickstart.ipynb": 4,  # input/crop, top-5 bars, attention maps, timm scatter
    "02_feature_extraction.ipynb": 2,  # neighbour gallery, PCA
    "03_finetune.ipynb": 2,  # curves, prediction grid
    "04_nnx.ipynb": 2,  # BEiT-3 attention and token norms, NNX fine-tuning curves
    "05_segmentation.ipynb": 3,  # overlays (whole / slide), curves, predictions vs truth
}


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_is_stripped_and_runs(name, imagenet_dir, monkeypatch, tmp_path):
    path = ROOT / "notebooks" / name
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "commit notebooks with outputs stripped"
    assert "colab.research.google.com" in nb.cells[0].source

    # As a user opens it from a fresh clone: the installed package, ../shared beside the clone, the
    # notebook's folder as working directory, no variables of ours. The Hub is unreachable here (no
    # network); HF_HUB_OFFLINE makes that answer immediate, an empty HF_HOME means no cached weights.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    # (nor the test run's compilation cache: conftest.py)
    for var in ("BEIT_JAX_IMAGES", "BEIT_JAX_CHECKPOINT", "PYTHONPATH", *XLA_CACHE_VARS):
        monkeypatch.delenv(var, raising=False)
    # nbclient waits 4 s by default for a cell's last outputs and then drops them with a log line: a
    # loaded CI machine must not lose a figure or an error that way
    NotebookClient(nb, timeout=900, kernel_name="python3", startup_timeout=300, iopub_timeout=120,
                   raise_on_iopub_timeout=True, resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    figures = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert len(figures) >= NOTEBOOKS[name], f"{name}: {len(figures)} figures"
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "RANDOM" in text or "random init" in text  # offline runs say what they run on
    if "images from:" in text:  # found the real photos beside the clone, not a fallback
        assert "images from: ../../shared/data/imagenet-sample" in text, text[:2000]
    if name == "03_finetune.ipynb":  # the CPU quick mode learns (chance is 0.1), and timm agrees with the export
        import re
        top1 = float(re.search(r"val top-1 ([0-9.]+)", text).group(1))
        assert top1 > 0.35, text[-2000:]
        assert "timm loads it (strict); same predictions: True" in text, text[-2000:]
    if name == "05_segmentation.ipynb":  # the fine-tune learns on held-out shapes; transformers reads the export
        import re
        before, after = (float(v) for v in re.search(r"val mIoU ([0-9.]+) -> ([0-9.]+)", text).groups())
        assert after > before + 0.3, text[-2000:]
        diff = float(re.search(r"transformers loads it; .* max logit diff ([0-9.e+-]+)", text).group(1))
        assert diff < 1e-4, text[-2000:]
    if name == "02_feature_extraction.ipynb":
        assert "48 images on" in text and "failures: 0" in text, text[-2000:]
