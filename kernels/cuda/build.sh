#!/usr/bin/env bash
# Rebuild the cubins of kernels/cuda/ (needs nvcc >= 12.4; the CPU machines have 13.0) and record
# each source's sha256 beside its cubin, which tests/test_cuda_cubins.py checks.
set -euo pipefail
cd "$(dirname "$0")"
nvcc -arch=sm_90 -cubin -O3 -o hack_decode_sm90.cubin hack_decode.cu
sha256sum hack_decode.cu | cut -d' ' -f1 > hack_decode_sm90.cubin.sha256
echo "built hack_decode_sm90.cubin ($(stat -c %s hack_decode_sm90.cubin) bytes)"
