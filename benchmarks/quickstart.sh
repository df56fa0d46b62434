#!/usr/bin/env bash
# Times the README's first command from a fresh workdir (data generation, compilation and
# evaluation included) and prints the wall time and the final validation accuracy.
#   bash benchmarks/quickstart.sh
set -euo pipefail
cd "$(dirname "$0")/.."
workdir="$(mktemp -d)/quickstart"
start=$(date +%s.%N)
python -m alexnet_jax.main --config=configs/quickstart.py --workdir="$workdir" 2>"$workdir.log"
end=$(date +%s.%N)
python - "$workdir" "$start" "$end" <<'PY'
import json, sys
from alexnet_jax.training.metrics import read_metrics
workdir, start, end = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
last = [r for r in read_metrics(workdir) if "val/top1_error" in r][-1]
print(json.dumps({"wall_seconds": round(end - start, 1), "step": last["step"],
                  "val_top1_accuracy": round(1 - last["val/top1_error"], 4),
                  "val_top5_accuracy": round(1 - last["val/top5_error"], 4)}))
PY
