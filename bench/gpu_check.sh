#!/usr/bin/env bash
# One short GPU check (under 10 minutes on one GPU, enforced: every command has its own time limit and
# none runs past 570 s from the start): training throughput (tokens/s) and MFU of mtp_baseline at 1.06B
# parameters, bf16, sequence 2048, plainly and under FSDP2 in one process (bench/train_throughput.py);
# the bf16 sequential/all-at-once step ratio at the same size; the §9 step benchmarks on CUDA; and the
# training entry on the GPU with bf16, plainly and under FSDP2 (one process), on the tiny default models.
# Run from the project root: bash bench/gpu_check.sh [out_dir] [--peak-tflops X for a GPU not in the table]
set -uo pipefail
out=${1:-gpu_check}
shift $(( $# > 0 ? 1 : 0 ))
peak_flag=("$@")
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
deadline=$((SECONDS + 570))

step() {  # step LABEL LIMIT CMD...: run CMD for at most LIMIT seconds, never past the deadline
  local label=$1 limit=$2 left t0
  shift 2
  left=$((deadline - SECONDS))
  if (( left < 10 )); then
    echo "== $label SKIPPED: the script's 570 s are spent"
    return
  fi
  (( left < limit )) && limit=$left
  echo "== $label (limit ${limit} s)"
  t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" || echo "$label FAILED (status $?; 124 = timed out)"
  echo "   $label took $((SECONDS - t0)) s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"
step "mtp_baseline training throughput and MFU, 1.06B, bf16, sequence 2048, plain and FSDP2 (1 process)" 120 \
  python3 bench/train_throughput.py --device cuda "${peak_flag[@]}"
step "heads_step, bf16 autocast, 1.1B (hidden 2048, 14+4 blocks), sequence 2048" 100 \
  python3 bench/heads_step.py --device cuda --autocast --vocab 32000 --hidden 2048 --layers 18 --length 2048 --batch 4 --chunk 512 --rounds 5
step "heads_step (vocab 32k)" 45 \
  python3 bench/heads_step.py --device cuda --vocab 32000 --hidden 1024 --layers 8 --length 1024 --batch 8 --chunk 256 --rounds 7
step "heads_step, bf16 autocast" 45 \
  python3 bench/heads_step.py --device cuda --autocast --vocab 32000 --hidden 1024 --layers 8 --length 1024 --batch 8 --chunk 256 --rounds 7
step "weighted_step" 45 \
  python3 bench/weighted_step.py --device cuda --vocab 32000 --hidden 1024 --layers 8 --length 1024 --batch 8 --chunk 256
step "self-speculative vs greedy decoding, hidden 1024 (DESIGN §9: >= 1.5x where the forward dominates)" 90 \
  python3 bench/speculative.py --device cuda
echo "== training on the GPU (bf16), tiny models"
python3 - "$out" <<'PY' || echo "config FAILED"
import sys
from wmtp_lib.config import resolve_config, write_config
out = sys.argv[1]
for name, recipe, extra in (("gpu-rho1", "rho1", {}), ("gpu-critic", "critic", {"critic.stage1_max_steps": 20, "critic.stage1_eval_every": 5}),
                            ("gpu-fsdp", "rho1_tokenskip", {})):
    over = {"paths.models_dir": "/tmp/wmtp-models", "paths.runs_dir": out + "/runs", "train.steps": 60,
            "train.mixed_precision": "bf16", "train.log_every": 20, **extra}
    write_config(resolve_config(recipe, "local", over, run_name=name), f"{out}/{name}.yaml")
PY
step "rho1 bf16" 40 bash -c "set -o pipefail; python3 -m wmtp_lib.train --config '$out/gpu-rho1.yaml' 2>&1 | grep -v Warning | tail -6"
step "critic bf16" 45 bash -c "set -o pipefail; python3 -m wmtp_lib.train --config '$out/gpu-critic.yaml' 2>&1 | grep -v Warning | tail -6"
step "rho1_tokenskip bf16 under FSDP2 (1 process)" 40 bash -c "set -o pipefail; python3 -m accelerate.commands.launch \
  --config_file params/accelerate/fsdp_4gpu.yaml --num_processes 1 -m wmtp_lib.train --config '$out/gpu-fsdp.yaml' \
  2>&1 | grep -v Warning | tail -6"
ls "$out"/runs/*/final 2>/dev/null
echo "gpu_check: $SECONDS s in all"
