#!/usr/bin/env bash
# Install NNCodec (the MPEG-7 NNC reference coder, DeepCABAC) into its own venv for tools/bench.py --nncodec.
#
#   bash tools/install_nncodec.sh            # venv in .cache/nncodec-venv (git-ignored)
#   NNCODEC_VENV=/some/dir bash tools/install_nncodec.sh
#
# NNCodec is not a dependency of dcz. It needs numpy<2 (dcz needs numpy 2), so it lives in a separate venv and
# tools/nncodec_peer.py runs there as a subprocess. Only its tensor coder (nncodec.nnc_core, numpy + the C++
# extension) is used; `--no-deps` keeps pip from pulling torch, torchvision (CUDA builds), pandas or opencv,
# which its higher-level modules import. Takes about 80 s on 2 cores (it compiles the extension).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${NNCODEC_VENV:-$ROOT/.cache/nncodec-venv}"
NNCODEC_VERSION="2.1.3"
PY="${PYTHON:-python3}"

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import nncodec.nnc_core" 2>/dev/null; then
    echo "nncodec already installed in $VENV"
    exit 0
fi
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip setuptools wheel
# numpy<2: nncodec 2.1.3's extension and nnc_core are built against the numpy 1 API.
"$VENV/bin/python" -m pip install --quiet "numpy<2" pybind11
"$VENV/bin/python" -m pip install --no-deps --no-build-isolation "nncodec==$NNCODEC_VERSION"
"$VENV/bin/python" -c "import nncodec.nnc_core; print('nncodec.nnc_core ok')"
echo "NNCodec $NNCODEC_VERSION installed in $VENV (python: $VENV/bin/python)"
