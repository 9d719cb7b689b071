#!/usr/bin/env bash
# Create (or reuse) .venv in the repo root and install the pinned stack into it.
# Idempotent: a second run with unchanged requirements installs nothing.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${REFCONV_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3

STAMP="$VENV/.refconv_mm-stack"
WANT="$(cat "$ROOT"/requirements/*.txt "$ROOT/setup.py" "$0" | sha256sum | cut -d' ' -f1)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
    exit 0
fi

ver="$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
if [[ "$ver" != "3.11" ]]; then
    echo "refconv_mm: the pinned stack needs Python 3.11, found $ver at $(command -v "$PY")." >&2
    echo "            Set PYTHON=/path/to/python3.11 and run again." >&2
    exit 2
fi
source "$ROOT/tools/env_checks.sh"
need_cxx
need_disk "$VENV" REFCONV_VENV
echo "[setup] virtual environment: $VENV"
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

step() { echo "[setup] $*"; }
# torch 2.13.0 as PyPI builds it (CUDA runtime included; runs on a machine without a GPU): the
# registry's torchvision wheels (0.28.0 pairs with torch 2.13) link torch's CUDA libraries and
# mmpretrain imports torchvision. '===' skips a CPU-only '2.13.0+cpu' wheel that a local wheel
# directory may hold, which '==' would prefer (README "Installation").
if ! "$VENV/bin/python" -c 'import sys, torch, torchvision
sys.exit(not (torch.__version__.startswith("2.13.0") and torchvision.__version__.startswith("0.28.0")))
' 2>/dev/null; then
    step "torch 2.13.0 + torchvision 0.28.0 (PyPI builds, about 3 GB with the CUDA runtime packages)"
    pip_run "${PIP[@]}" uninstall -q -y torch torchvision 2>/dev/null || true
    pip_run "${PIP[@]}" install -q 'torch===2.13.0' 'torchvision===0.28.0' -c "$ROOT/requirements/runtime.txt"
fi
step "runtime requirements"
pip_run "${PIP[@]}" install -q -r "$ROOT/requirements/runtime.txt"
step "mmengine 0.10.7"
pip_run "${PIP[@]}" install -q --no-deps mmengine==0.10.7
if ! "$VENV/bin/python" -c 'import mmcv, mmcv.ops, sys; sys.exit(mmcv.__version__ != "2.1.0")' 2>/dev/null; then
    step "mmcv 2.1.0 from source with CPU ops (10-15 minutes on 2 cores the first time; pip caches the wheel)"
    build_mmcv mmcv==2.1.0
fi
step "mmdet 3.3.0, mmsegmentation 1.2.2"
pip_run "${PIP[@]}" install -q -r "$ROOT/requirements/openmmlab.txt" -c "$ROOT/requirements/runtime.txt"
step "test and tool requirements"
pip_run "${PIP[@]}" install -q -r "$ROOT/requirements/tests.txt" -c "$ROOT/requirements/runtime.txt"
step "deploy stack: onnx, onnxruntime, mmdeploy 1.3.1 (--no-deps: its deps are requirements/deploy.txt)"
pip_run "${PIP[@]}" install -q -r "$ROOT/requirements/deploy.txt" -c "$ROOT/requirements/runtime.txt"
pip_run "${PIP[@]}" install -q --no-deps mmdeploy==1.3.1
step "refconv_mm (editable)"
pip_run "${PIP[@]}" install -q --no-deps --no-build-isolation -e "$ROOT"
"$VENV/bin/python" -c 'import refconv_mm, mmdet, mmseg, mmcv.ops, mmdeploy, onnxruntime; print("[setup] ok: refconv_mm", refconv_mm.__version__)'
echo "$WANT" > "$STAMP"
