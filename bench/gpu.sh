#!/usr/bin/env bash
# One short GPU check (a few minutes) for a session that is lent a GPU: training tokens/s and utilisation of
# the char model and PTB-medium through lmtool and a bare loop, fp32 and bf16, plus the GPU's matmul peak.
# Usage: bash bench/gpu.sh [DATA_DIR]   (DATA_DIR defaults to ../shared/data)
set -euo pipefail
cd "$(dirname "$0")/.."
data="${1:-../shared/data}"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible'; print('gpu:', torch.cuda.get_device_name(0), 'torch', torch.__version__, 'cudnn', torch.backends.cudnn.version())"
python bench/train_throughput.py --device cuda --steps 30 --only char,ptb-medium --data "$data"
