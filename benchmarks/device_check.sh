#!/usr/bin/env bash
# The device check: one command, under 8 minutes on one H100/H200, for a session lent a GPU.
#
#   bash benchmarks/device_check.sh            # after: python3 -m venv .venv &&
#                                              #   .venv/bin/pip install -e ".[test]" "jax[cuda12]"
#
# 1. parity on the GPU: beit-jax vs timm logits with jax.default_matmul_precision("float32")
#    (and TF32 off in torch), BEiT-B and BEiT-L;
# 2. BEiT-B and BEiT-L bf16 img/s and MFU at batch 256, per attention path beit-jax picks or is
#    told (xla / cudnn), beside timm AMP (bf16 autocast, channels_last) eager and torch.compile,
#    interleaved in one run (bench_model.py --device gpu);
# 3. end-to-end extraction img/s with every host core decoding (threads and processes), exact and
#    --decode fast, on ImageNet-size photos and on the same photos at 2048 px (bench_pipeline.py).
# Writes benchmarks/results/model-gpu.*, pipeline-gpu.* and device.md (the card named on top).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || { echo "device_check: $PY not found: make the venv first (see the top of this file)" >&2; exit 2; }
card=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1) || true
[ -n "$card" ] || { echo "device_check: nvidia-smi finds no GPU here" >&2; exit 2; }
"$PY" -c "import jax, sys; sys.exit(0 if jax.default_backend() == 'gpu' else
  'device_check: JAX runs on ' + jax.default_backend() + ': pip install \"jax[cuda12]\" into the venv')"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'device_check: torch sees no CUDA device')"
echo "device check on: $card"
start=$(date +%s)
timeout 330 "$PY" benchmarks/bench_model.py --device gpu --groups base:256,large:256 --rounds 2 \
    --target-seconds 2 --skip-pipeline
timeout 150 "$PY" benchmarks/bench_pipeline.py --device gpu --images 4096
{
  echo "# Device check: $card"
  echo
  echo "$(date -u +%F), \`bash benchmarks/device_check.sh\`, $(( $(date +%s) - start )) s."
  echo
  echo "## Model (parity, bf16 img/s, MFU, attention path; timm AMP eager / torch.compile beside)"
  echo
  cat benchmarks/results/model-gpu.md
  echo
  echo "## Extraction end to end (every host core decoding; exact and --decode fast)"
  echo
  cat benchmarks/results/pipeline-gpu.md
} > benchmarks/results/device.md
echo "wrote benchmarks/results/device.md"
