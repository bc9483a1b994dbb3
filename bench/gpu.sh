#!/usr/bin/env bash
# One short GPU check for a session that is lent a GPU. On an H200 one call of sections 1-9 took 369 s and
# sections 10 and 1 took 102 s (2026-11-27, runs 7 and 8; earlier 373 s in three runs: 8 7 3 6a: 117 s; 6a 6b 9 2
# 1: 148 s; 4 5: 108 s); on an H100, sections 1-6 took 6 minutes. In order:
#   1. the CLI end to end on CUDA: train the char model for 300 steps, then sample, score and evaluate with it
#      (one exact stream, then 64 streams in fp32 and in bf16);
#   2. host syncs per training step, counted by PyTorch's sync detector (bench/gpu_syncs.py; target 0);
#   3. training tokens/s and utilisation of the char model and PTB-medium, lmtool against a bare loop, fp32
#      and bf16, with the GPU's matmul peaks measured in the same run (bench/train_throughput.py);
#   4. bf16 against fp32 for the same tokens: speed and validation loss (bench/precision.py);
#   5. kernels and GPU time per step against wall time per step, lmtool and the bare loop (bench/gpu_profile.py);
#   6. training-step variants timed in turn: lmtool against the bare loop, bf16 recurrences, and lmtool's step
#      replayed as a CUDA graph (bench/gpu_steps.py);
#   7. lmtool's training with and without its step captured as a CUDA graph: speed and losses (bench/cuda_graph.py);
#   8. whether replays stay exact with other GPU work between them (bench/gpu_replay_check.py);
#   9. batched generation of the char model, 1 to 1,024 streams, fp32 and bf16 (bench/sampling.py --device cuda);
#  10. evaluation with its windows replayed as a CUDA graph against eager windows (bench/gpu_eval.py);
#  11. generation with its token step replayed as a CUDA graph against eager steps (bench/gpu_sampling.py).
# A section that fails says so and the next one still runs, so one run of this script reports everything it can.
# Usage: bash bench/gpu.sh [DATA_DIR [SECTION ...]]   (DATA_DIR defaults to ../shared/data; SECTIONs, e.g. 8 7 3 6a,
# run only those, in the order given; set PYTHON to pick the interpreter)
set -uo pipefail
cd "$(dirname "$0")/.."
data="${1:-../shared/data}"
shift $(( $# > 0 ? 1 : 0 ))
chosen=("$@")
py="${PYTHON:-python}"
export PYTHONUNBUFFERED=1
$py -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible'; print('gpu:', torch.cuda.get_device_name(0), 'torch', torch.__version__, 'cudnn', torch.backends.cudnn.version())" ||
    { echo "bench/gpu.sh: needs a CUDA GPU that PyTorch can see" >&2; exit 1; }
date -u +"date: %Y-%m-%dT%H:%M:%SZ"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
section() {  # section TITLE COMMAND...: run it, and say so if it fails
    echo "== $1"
    shift
    "$@" || echo "!! failed with exit code $?: $*"
}

cli_end_to_end() {  # each command only after the one before it worked
    $py -m lmtool train "$data/tinyshakespeare/input.txt" --device cuda --max-steps 300 --out "$work/char" \
        --set train.eval_every=150 --set train.log_every=50 &&
    $py -m lmtool sample --model "$work/char" --device cuda --prime "ROMEO:" --length 120 --seed 1 &&
    $py -m lmtool sample --model "$work/char" --device cuda --length 60 --num-samples 4 --seed 1 &&
    $py -m lmtool score --model "$work/char" --device cuda "To be, or not to be: that is the question." &&
    $py -m lmtool evaluate-perplexity --model "$work/char" --device cuda "$data/tinyshakespeare/input.txt" &&
    $py -m lmtool evaluate-perplexity --model "$work/char" --device cuda --batch-size 64 "$data/tinyshakespeare/input.txt" &&
    $py -m lmtool evaluate-perplexity --model "$work/char" --device cuda --batch-size 64 --precision bf16 \
        "$data/tinyshakespeare/input.txt"
}

run_section() {  # run_section NUMBER: one section of the list above
    case "$1" in
        1) section "1. CLI end to end on cuda" cli_end_to_end ;;
        2) section "2. host syncs per training step" $py bench/gpu_syncs.py --data "$data" ;;
        3) section "3. training throughput" \
               $py bench/train_throughput.py --device cuda --steps 200 --rounds 1 --only char,ptb,ptb-medium --data "$data" ;;
        4) section "4. bf16 against fp32 on the char model" \
               $py bench/precision.py --device cuda --steps 300 --speed-rounds 0 --corpus "$data/tinyshakespeare/input.txt" ;;
        5) section "5. where a step's time goes" $py bench/gpu_profile.py --data "$data" --only ptb-medium,char ;;
        6a) section "6a. step variants, PTB-medium" $py bench/gpu_steps.py --workload ptb-medium ;;
        6b) section "6b. step variants, char" $py bench/gpu_steps.py --workload char ;;
        7) section "7. training with and without a CUDA graph" $py bench/cuda_graph.py --data "$data" ;;
        8) section "8. replays with other GPU work between them" $py bench/gpu_replay_check.py ;;
        9) section "9. batched generation" $py bench/sampling.py --device cuda --streams 1,8,64,256,1024 ;;
        10) section "10. evaluation with and without a CUDA graph" $py bench/gpu_eval.py ;;
        11) section "11. generation with and without a CUDA graph" $py bench/gpu_sampling.py ;;
        *) echo "!! no section $1 (sections: 1 2 3 4 5 6a 6b 7 8 9 10 11)" ;;
    esac
}

if [ ${#chosen[@]} -eq 0 ]; then chosen=(1 2 3 4 5 6a 6b 7 8 9 10 11); fi
for number in "${chosen[@]}"; do run_section "$number"; done
