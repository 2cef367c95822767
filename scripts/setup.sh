#!/usr/bin/env bash
# Create .venv and install circe into it, with a torch/torchvision pair that imports together.
#
# open_clip needs torchvision, and torchvision only imports beside the torch it was built for,
# so the pair is chosen here rather than left to the resolver. Override with
#   CIRCE_TORCH="torch==X torchvision==Y" bash scripts/setup.sh
# (for example to pick a CUDA build matching your driver). If the venv already has a torch
# that satisfies pyproject.toml's range, it is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
extras="${CIRCE_EXTRAS:-dev}"

[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

if [ -n "${CIRCE_TORCH:-}" ]; then
  pair="$CIRCE_TORCH"
elif .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  pair=""
else
  case "$(uname -m)" in
    aarch64|arm64) pair="torch==2.9.1 torchvision==0.24.1" ;;  # CPU build on aarch64 Linux
    *) pair="torch==2.14.1 torchvision==0.29.1" ;;
  esac
fi
if [ -n "$pair" ]; then
  echo "installing $pair"
  # shellcheck disable=SC2086
  "${pip[@]}" $pair
fi
echo "installing circe[$extras]"
"${pip[@]}" -e ".[$extras]"
.venv/bin/python -c "import circe, open_clip, torchvision; print('circe', circe.__version__, 'ready')"
