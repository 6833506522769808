#!/usr/bin/env bash
# Installs torch into the given venv's python unless one is already there.
# A machine without an NVIDIA GPU gets the CPU build: from a local wheel when the machine
# provides one (pip's find-links), else from PyTorch's CPU index. A GPU machine gets PyPI's torch.
set -euo pipefail
py="$1"
if "$py" -c "import torch" 2>/dev/null; then exit 0; fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
  exec "$py" -m pip install torch
fi
for wheel in /opt/wheels/torch-*+cpu-*.whl; do
  [ -e "$wheel" ] || continue
  version=$(basename "$wheel" | cut -d- -f2)
  exec "$py" -m pip install "torch==${version}"
done
exec "$py" -m pip install torch --index-url https://download.pytorch.org/whl/cpu
