#!/bin/bash
# Issue 27 on the GPU machine's 16 CPU cores, one call (about 5 min): the default figure's first
# 10^5 samples on the CPU with the new default (a worker per core, up to the runs and memory)
# against --jobs 2, each printing its estimate and wall time (the many-worker estimate check).
# Run with: run(command="bash .ci/cpu16_check.sh", carry=[".carry"]), .carry/ holding the
# pyautoencoder 2.1.0 wheel and the four MNIST files gzipped (the developers' guide says how).
set -x
cd "$(dirname "$0")/.."
pip install -q --no-deps .carry/pyautoencoder-2.1.0-py3-none-any.whl
mkdir -p data/MNIST/raw
for f in .carry/*-ubyte.gz; do gunzip -c "$f" > "data/MNIST/raw/$(basename "$f" .gz)"; done
nproc; python -c "import os; print(len(os.sched_getaffinity(0)))"; grep MemAvailable /proc/meminfo
lscpu | head -20 > "$OUT/lscpu.txt"
for mode in default jobs2; do
  extra=""; [ "$mode" = jobs2 ] && extra="--jobs 2"
  /usr/bin/time -v python -u reproduce_fig2.py --device cpu --samples 1e5 --data-dir data \
    --out-dir "$OUT/$mode" $extra ${G27_EXTRA:-} > "$OUT/$mode.log" 2> "$OUT/$mode.err"
  echo "$mode exit $?"; grep -E "estimate|wall time|Maximum resident|Elapsed" "$OUT/$mode.log" "$OUT/$mode.err"
done
rm -rf "$OUT"/*/checkpoints "$OUT"/*/models
