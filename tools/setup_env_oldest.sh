#!/usr/bin/env bash
# Create (or reuse) .venv-py38 in the repo root with the OLDEST supported stack
# (requirements/oldest.txt: Python 3.8, torch 2.0.1, mmcv 2.1.0 built from source against it,
# mmdet 3.3.0, mmsegmentation 1.2.2, mmpretrain 1.2.0, numpy < 1.25), then install refconv_mm
# into it the way a user would (`pip install -e .`, dependencies resolved against what is there).
# Idempotent: a second run with unchanged requirements installs nothing.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${REFCONV_OLD_VENV:-$ROOT/.venv-py38}"
PY="${PYTHON38:-}"
if [[ -z "$PY" ]]; then
    for c in python3.8 "${HOME:-/root}"/.pyenv/versions/3.8*/bin/python3.8 /usr/bin/python3.8; do
        # a pyenv shim answers `command -v` but may not run: ask the interpreter itself
        "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 8))' >/dev/null 2>&1 \
            && { PY="$c"; break; }
    done
fi
if [[ -z "$PY" ]] || ! "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 8))' 2>/dev/null; then
    echo "refconv_mm: the oldest supported stack needs Python 3.8; none found." \
        "Set PYTHON38=/path/to/python3.8 and run again." >&2
    exit 2
fi
STAMP="$VENV/.refconv_mm-stack"
WANT="$(cat "$ROOT/requirements/oldest.txt" "$ROOT/requirements/mminstall.txt" \
    "$ROOT/requirements/build.txt" "$ROOT/requirements/tests.txt" "$ROOT/setup.py" "$0" \
    | sha256sum | cut -d' ' -f1)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
    exit 0
fi
source "$ROOT/tools/env_checks.sh"
need_cxx
need_disk "$VENV" REFCONV_OLD_VENV
echo "[setup-oldest] virtual environment: $VENV ($("$PY" --version))"
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
# A local wheel directory may hold a newer CPU torch for another Python: take the registry's.
export PIP_FIND_LINKS=
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
C=(-c "$ROOT/requirements/oldest.txt")
step() { echo "[setup-oldest] $*"; }

step "pip, setuptools<70, wheel"
# setuptools<70 is this stack's own pin (requirements/oldest.txt); setuptools<70.1 needs wheel to
# build any wheel with --no-build-isolation (refconv_mm's, tests/test_install.py's).
pip_run "${PIP[@]}" install -q -U 'pip<25' setuptools wheel "${C[@]}"
# torch 2.0.1 as PyPI builds it: its CUDA 11.7 runtime packages come along (the wheel links
# them at import even on a machine without a GPU).
step "torch 2.0.1 + torchvision 0.15.2, numpy<1.25 (about 2.5 GB with the CUDA runtime packages)"
pip_run "${PIP[@]}" install -q torch torchvision numpy "${C[@]}"
# Before mmengine: openmim's openxlab pins (rich, packaging, requests, setuptools ~=60.2) would
# otherwise reinstall packages under the --no-deps mmengine, and pip's check would then name its
# opencv-python (headless OpenCV stands in) in an ERROR line.
step "test and tool requirements"
pip_run "${PIP[@]}" install -q -r "$ROOT/requirements/tests.txt" "${C[@]}"
# torch 2.0's ONNX exporter imports onnx to write a file (tests/test_refconv_layer.py)
pip_run "${PIP[@]}" install -q onnx "${C[@]}"
step "mmengine 0.10.7 and its requirements (headless OpenCV instead of opencv-python)"
pip_run "${PIP[@]}" install -q opencv-python-headless addict matplotlib pyyaml rich termcolor yapf \
    packaging Pillow ftfy regex "${C[@]}"
pip_run "${PIP[@]}" install -q --no-deps mmengine "${C[@]}"
if ! "$VENV/bin/python" -c 'import mmcv, mmcv.ops, sys; sys.exit(mmcv.__version__ != "2.1.0")' 2>/dev/null; then
    step "mmcv 2.1.0 from source with CPU ops against torch 2.0.1 (10-20 minutes on 2 cores the first time; pip caches the wheel)"
    build_mmcv mmcv "${C[@]}"
fi
step "mmdet 3.3.0, mmsegmentation 1.2.2, mmpretrain 1.2.0"
pip_run "${PIP[@]}" install -q mmdet mmsegmentation mmpretrain "${C[@]}"
step "refconv_mm (editable, as a user installs it: pip resolves its ranges against this stack)"
pip_run "${PIP[@]}" install -q --no-build-isolation -e "$ROOT" "${C[@]}"
"$VENV/bin/python" -c 'import refconv_mm, torch, mmcv.ops, mmdet, mmseg, mmpretrain
print("[setup-oldest] ok: refconv_mm", refconv_mm.__version__, "torch", torch.__version__)'
echo "$WANT" > "$STAMP"
