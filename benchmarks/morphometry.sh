#!/usr/bin/env bash
# Morphometry benchmark against ORMIR_XCT, localthickness and porespy (see morphometry.py).
# The peers live in their own environment (.venv-bench), next to femursr, so that the
# project's environment stays free of them.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv-bench/bin/python ]; then
    python3 -m venv .venv-bench
    # edt as porespy 3.2 requires it (femursr pins 3.1.2; the distance transforms are the same)
    .venv-bench/bin/pip install -q numpy==2.4.6 scipy==1.17.1 pandas==3.1.1 numba==0.68.1 \
        ormir-xct==1.1.0 porespy==3.2.0 localthickness==0.1.3
fi
exec .venv-bench/bin/python benchmarks/morphometry.py "$@"
