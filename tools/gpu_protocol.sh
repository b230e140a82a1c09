#!/usr/bin/env bash
# The paper's protocol on a fresh GPU machine, run as is from a copy of the working tree (tracked files plus the
# git-ignored carry/ folder, 64 MiB at most): the training-throughput benchmark, then `klgrade reproduce` with a
# time budget, everything written to OUT (at most 8 files, for a transfer that returns only a few).
#
# Prepare carry/ here, once (about 31 MiB of data and 8 MiB of wheels for what the GPU image lacks):
#   python tools/pack_dataset.py ../shared/data/kneeKL224 carry/kneeKL224 --size 160 --quality 70
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 -d carry/wheels kornia==0.9.0 kornia_rs==0.2.0 captum==0.9.0
# Run there:
#   tools/gpu_protocol.sh OUT [MINUTES]       MINUTES: no fold starts after this many [6]
# Settings (environment): PROTOCOL_DATA [carry/kneeKL224], PROTOCOL_PROFILE [paper], PROTOCOL_JOBS [4],
#   PROTOCOL_DEVICE [cuda], PROTOCOL_VARIANTS (run folder names, e.g. "resnet18 msa_net") [all nine],
#   THROUGHPUT_ARGS [--batch 128 --size 160 --steps 30 --concurrency 2 4], PYTHON [python3].
# OUT gets: machine.txt, throughput.txt, throughput.json, protocol.log, report.md, results.json and
# protocol.tar.gz (tables, differences to msa_net, figures, per-fold metrics and timings).
set -euo pipefail
out=$(realpath -m "${1:?usage: tools/gpu_protocol.sh OUT [MINUTES]}")
minutes=${2:-6}
data=${PROTOCOL_DATA:-carry/kneeKL224}
profile=${PROTOCOL_PROFILE:-paper}
jobs=${PROTOCOL_JOBS:-4}
device=${PROTOCOL_DEVICE:-cuda}
throughput_args=${THROUGHPUT_ARGS:---batch 128 --size 160 --steps 30 --concurrency 2 4}
variant_args=()
for variant in ${PROTOCOL_VARIANTS:-}; do variant_args+=(--variant "$variant"); done
python=${PYTHON:-python3}
cd "$(dirname "$0")/.."
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT  # the protocol's checkpoints and image cache: what matters is copied to OUT

# The carried wheels only where klgrade's extra imports are missing (they are built for the GPU image's Python).
if ! "$python" -c "import kornia, captum" 2>/dev/null && compgen -G "carry/wheels/*.whl" >/dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$work/site" carry/wheels/*.whl
    export PYTHONPATH="$work/site"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 KLGRADE_CACHE_DIR="$work/cache" \
    TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$work/inductor}"  # torch makes it on importing timm
[ -d "$data" ] || { echo "gpu_protocol: $data: no such data folder (see the preparation above)" >&2; exit 2; }

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU";
  "$python" -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"
} > "$out/machine.txt"
cat "$out/machine.txt"

# shellcheck disable=SC2086  # the arguments are meant to split
"$python" benchmarks/train_throughput.py $throughput_args --json "$out/throughput.json" 2>&1 | tee "$out/throughput.txt"

start=$(date +%s)
"$python" -m klgrade reproduce --data "$data" --out "$work/protocol" --profile "$profile" --device "$device" \
    --jobs "$jobs" --time-budget "$minutes" ${variant_args[@]+"${variant_args[@]}"} 2>&1 | tee "$out/protocol.log"
echo "reproduce wall time: $(( $(date +%s) - start )) s" | tee -a "$out/protocol.log"

cp "$work/protocol/report.md" "$work/protocol/results.json" "$out/"
tar -czf "$out/protocol.tar.gz" -C "$work/protocol" report.md results.json $(cd "$work/protocol" && ls *.csv) figures \
    $(cd "$work/protocol" && find runs -name "*.json" -o -name "*.md" -o -name "*.csv")
ls -la "$out"
