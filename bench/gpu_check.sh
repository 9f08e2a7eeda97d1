#!/usr/bin/env bash
# One short GPU check (a few minutes on one GPU): the §9 step benchmarks on CUDA, and the training
# entry on the GPU with bf16, plainly and under FSDP2 (one process), on the tiny default models.
# Run from the project root: bash bench/gpu_check.sh [out_dir]
set -uo pipefail
out=${1:-gpu_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"
echo "== heads_step (vocab 32k)"
python3 bench/heads_step.py --device cuda --vocab 32000 --hidden 1024 --layers 8 --length 1024 --batch 8 --chunk 256 --steps 5 || echo "heads_step FAILED"
echo "== heads_step, bf16 autocast"
python3 bench/heads_step.py --device cuda --autocast --vocab 32000 --hidden 1024 --layers 8 --length 1024 --batch 8 --chunk 256 --steps 5 || echo "heads_step bf16 FAILED"
echo "== weighted_step"
python3 bench/weighted_step.py --device cuda --vocab 32000 --hidden 1024 --layers 8 --length 1024 --batch 8 --chunk 256 || echo "weighted_step FAILED"
echo "== self-speculative vs greedy decoding, hidden 1024 (DESIGN §9: >= 1.5x where the forward dominates)"
python3 bench/speculative.py --device cuda || echo "speculative FAILED"
echo "== training on the GPU (bf16), tiny models"
python3 - "$out" <<'PY' || echo "config FAILED"
import sys
from wmtp_lib.config import resolve_config, write_config
out = sys.argv[1]
for name, recipe, extra in (("gpu-rho1", "rho1", {}), ("gpu-critic", "critic", {"critic.stage1_steps": 20}),
                            ("gpu-fsdp", "rho1_tokenskip", {})):
    over = {"paths.models_dir": "/tmp/wmtp-models", "paths.runs_dir": out + "/runs", "train.steps": 60,
            "train.mixed_precision": "bf16", "train.log_every": 20, **extra}
    write_config(resolve_config(recipe, "local", over, run_name=name), f"{out}/{name}.yaml")
PY
python3 -m wmtp_lib.train --config "$out/gpu-rho1.yaml" 2>&1 | grep -v Warning | tail -6 || echo "rho1 bf16 FAILED"
python3 -m wmtp_lib.train --config "$out/gpu-critic.yaml" 2>&1 | grep -v Warning | tail -6 || echo "critic bf16 FAILED"
python3 -m accelerate.commands.launch --config_file params/accelerate/fsdp_4gpu.yaml --num_processes 1 \
  -m wmtp_lib.train --config "$out/gpu-fsdp.yaml" 2>&1 | grep -v Warning | tail -6 || echo "fsdp bf16 FAILED"
ls "$out"/runs/*/final 2>/dev/null
