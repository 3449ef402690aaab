#!/usr/bin/env bash
# On one machine with two GPUs: the sharded path over NCCL, then a two-card 70B run.
#   bash tests/two_gpus.sh            (WORK=/some/dir for the ~40 GB synthetic 70B; default /tmp/two_gpus)
# 1. The whole suite. With two GPUs every 2-rank test runs one rank per GPU over NCCL (on one GPU or none they use
#    gloo), tests/test_gpu_sharded.py included: 2 ranks against 1, NF4 and pre-quantized, --cpu_offload, MoE experts,
#    kill -9 and resume, packed bytes unchanged.
# 2. Llama-3-70B's shape in NF4 (random weights, written by benchmark.py), 6 steps at seq 2048, batch 1, r=16 on
#    two ranks: tokens/s with the all-gathers, and GPU 0's peak memory, from metrics.jsonl. Compare with the one-card
#    figure benchmark.py --fake_world 2 gives (README, two 24 GB cards), which leaves communication out.
set -euo pipefail
cd "$(dirname "$0")/.."
gpus=$(python -c "import torch; print(torch.cuda.device_count())")
[ "$gpus" -ge 2 ] || { echo "error: this needs two GPUs; this machine has $gpus" >&2; exit 2; }
python -m pytest -q -rs tests

work=${WORK:-/tmp/two_gpus}
mkdir -p "$work"
model=$(python -c "import benchmark, pathlib; print(benchmark.synthetic_checkpoint('llama3-70b', 0, pathlib.Path('$work'), True))" | tail -1)
python -c "import benchmark, json; open('$work/rows.jsonl', 'w').writelines(json.dumps(r) + '\n' for r in benchmark.random_rows(64, 2048))"
torchrun --standalone --nproc_per_node 2 train.py --model "$model" --dataset "$work/rows.jsonl" --seq_len 2048 \
    --batch_size 1 --max_steps 6 --warmup_steps 0 --lora_rank 16 --output_dir "$work/run" --overwrite
python - "$work/run/metrics.jsonl" <<'PY'
import json, statistics, sys
steps = [m for m in map(json.loads, open(sys.argv[1])) if m.get("step", 0) > 2]
print(f"70B on 2 GPUs, NCCL, seq 2048, batch 1 per GPU, r=16: {statistics.median(m['tokens_per_s'] for m in steps):,.0f} "
      f"tokens/s (median of steps 3-6), GPU 0 peak {max(m['peak_mem_gib'] for m in steps):.1f} GiB")
PY
