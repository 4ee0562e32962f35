#!/usr/bin/env bash
# The GPU check, in one go of at most 9 minutes (its time limits add up to 530 s) on a machine
# with an NVIDIA GPU and torch:
#   1. the tests marked cuda;
#   2. tests/benchmark.py (one run, then all ten in flight) beside the plain-PyTorch yardstick;
#   3. AEVB N_z = 20 to 10^6 samples, compared with docs/cpu_1e6/ (within the 4-seed spread).
# It needs, in $CARRY (default .carry/): pyautoencoder's wheel (pip download pyautoencoder==2.1.0
# --no-deps -d .carry), the four MNIST files gzipped (train-images-idx3-ubyte.gz, ...) and the
# yardstick gpu_step.py (optional). It writes its logs and JSON under $OUT (default ./gpu_check).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check}
CARRY=${CARRY:-.carry}
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
mkdir -p "$OUT"
python -c "import pyautoencoder" 2>/dev/null || pip install -q --no-deps "$CARRY"/pyautoencoder-*.whl
DATA=$(mktemp -d)
mkdir -p "$DATA/MNIST/raw"
for f in "$CARRY"/*-ubyte.gz; do gunzip -c "$f" >"$DATA/MNIST/raw/$(basename "$f" .gz)"; done

{ nvidia-smi --query-gpu=name,driver_version --format=csv
  python -c "import torch; print('torch', torch.__version__)"
  timeout 200 python -m pytest -q -m cuda -p no:cacheprovider tests; } 2>&1 | tee "$OUT/tests.log"

{ timeout 100 python tests/benchmark.py --data-dir "$DATA" \
    --json "$OUT/benchmark.json"
  if [ -f "$CARRY/gpu_step.py" ]; then timeout 80 python "$CARRY/gpu_step.py" 2; fi
} 2>&1 | tee "$OUT/benchmark.log"

RUN=$(mktemp -d)
timeout 150 python reproduce_fig2.py --latent-dims 20 --methods aevb --samples 1e6 \
  --data-dir "$DATA" --out-dir "$RUN" 2>&1 | tee "$OUT/run_1e6.log"
cp "$RUN/vae_mnist_fig2_repro.json" "$OUT/run_1e6.json"
python - "$OUT/run_1e6.json" "$OUT/compare_1e6.json" <<'PY'
"""The GPU's AEVB N_z = 20 at 10^6 against the CPU's (docs/cpu_1e6), within the seed spread."""
import json
import sys

SPREAD = 4.1  # nats: four seeds' test ELBO range, AEVB N_z = 20 at 10^6 (docs/analysis.md)


def last(path: str) -> dict:
    runs = json.load(open(path))["runs"]
    (run,) = [r for r in runs if r["method"] == "aevb" and r["latent_dim"] == 20]
    return run["evals"][-1] | {"log_px": (run.get("log_px") or {}).get("test")}


gpu, cpu = last(sys.argv[1]), last("docs/cpu_1e6/vae_mnist_fig2_repro.json")
verdict = {"gpu": gpu, "cpu": cpu, "spread": SPREAD}
verdict["test_elbo_difference"] = gpu["test_elbo"] - cpu["test_elbo"]
verdict["within_spread"] = abs(verdict["test_elbo_difference"]) <= SPREAD
json.dump(verdict, open(sys.argv[2], "w"), indent=1)
print(json.dumps(verdict, indent=1))
PY
