#!/usr/bin/env bash
# The performance benchmarks on one CUDA GPU, in under 10 minutes; the last line is one JSON summary.
#
#   bash benchmarks/gpu.sh            # PYTHON=... to choose the interpreter (it needs torch with CUDA and .[dev,peft])
#
# encode.py at Qwen-Scope's 1.7B shape (fp32 and bf16 SAE), real_shape.py (a random Qwen3-1.7B + LoRA, bf16, with a
# 2048 x 32768 k 50 SAE at layer 14; 16 rollouts x (128 + 256) tokens; capture at 128 x (64 + 2048)), and
# grpo_overhead.py on the test world, steer_throughput.py (steered generation of a random Qwen3-1.7B, 64 rows x
# (16 + 128) tokens, with a 2048 x 32768 SAE). Each has a time limit so that the set ends in time; a benchmark that fails
# or runs out of time is reported as such in the summary, with the tail of its log.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "benchmarks/gpu.sh: no CUDA device visible to $PY (torch.cuda.is_available() is False)" >&2
  exit 2
fi
"$PY" -c "import torch; print('GPU:', torch.cuda.get_device_name(), '| torch', torch.__version__)"

run() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "$?" > "$OUT/$name.rc"
  echo "$name: rc $(cat "$OUT/$name.rc"), $((SECONDS - start)) s; $(tail -n 1 "$OUT/$name.log" | cut -c1-300)"
}

run encode_fp32 60 "$PY" benchmarks/encode.py --repeats 5
run encode_bf16 50 "$PY" benchmarks/encode.py --repeats 5 --dtype bfloat16
run real_shape 300 "$PY" benchmarks/real_shape.py --rounds 1 --steps 2
run grpo_overhead 100 "$PY" benchmarks/grpo_overhead.py --size test --repeats 2 --steps 4
run steer_throughput 90 "$PY" benchmarks/steer_throughput.py

"$PY" - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path

import torch

out = Path(sys.argv[1])
summary = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
for name in ("encode_fp32", "encode_bf16", "real_shape", "grpo_overhead", "steer_throughput"):
    rc = int((out / f"{name}.rc").read_text())
    lines = (out / f"{name}.log").read_text().strip().splitlines()
    try:
        summary[name] = json.loads(lines[-1]) if rc == 0 else {"rc": rc, "tail": lines[-5:]}
    except (json.JSONDecodeError, IndexError):
        summary[name] = {"rc": rc, "tail": lines[-5:]}
print(json.dumps(summary))
PYEOF
