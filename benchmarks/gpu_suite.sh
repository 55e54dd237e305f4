#!/usr/bin/env bash
# One device call, several GPU benchmarks: each under its own time limit, results under $OUT.
#   PYTHONPATH=. bash benchmarks/gpu_suite.sh attention_fusion_gpu:240 fft_conv_gpu:120 ...
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=.
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv > "$OUT/suite.log" 2>&1
for item in "$@"; do
  name="${item%%:*}"; limit="${item##*:}"
  echo "=== $name (limit ${limit}s) $(date -u +%H:%M:%S)" | tee -a "$OUT/suite.log"
  timeout "$limit" python3 "benchmarks/$name.py" --out "$OUT/$name.json" 2>&1 \
    | grep -v -E '^\[transformers|FutureWarning|return cls.__new__' | tail -40 | tee -a "$OUT/suite.log"
  echo "=== $name exit ${PIPESTATUS[0]}" | tee -a "$OUT/suite.log"
done
