#!/usr/bin/env bash
# On a machine with a GPU (or a TPU): the fast tests, a two-pass training of the default
# configuration, the throughput benchmark, the batch-1 paths (XLA and the fused kernel)
# and the PyTorch comparison, in about six minutes, with one summary
# (device_check/summary.md). Options: see
#   python -m bench.device_check --help
# e.g.  bash tests/device_check.sh --data-dir /data/mnist-idx --tables
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" -m bench.device_check "$@"
