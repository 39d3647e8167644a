#!/usr/bin/env bash
# The GPU throughput check of bench/RESULTS.md: imcap against the straightforward reference step in bf16,
# 224 px, 20 decoder steps, frozen and layer4-trained encoder, both at the same caption samples a step:
# 1,280 (256 images x 5 captions), then 256 (51 x 5). Batches already on the GPU, then end to end from
# JPEG shards in memory (/dev/shm) through imcap's data path: JPEGs decoded by the data workers or on the
# GPU (data.jpeg_decode=device), and on the GPU in the training thread between steps (--ahead 0, no DeviceBatches
# thread); last, the decoder step compiled. Most important first, each invocation at most 3 minutes.
#   bash bench/gpu.sh SHARDS     # SHARDS: a directory of JPEG train shards with vocab.json (imcap shards build)
set -uo pipefail
shards=${1:?give a directory of JPEG train shards, e.g. built with imcap shards build}
workers=${WORKERS:-$(( $(nproc) - 2 ))}
seconds=${SECONDS_PER_KIND:-5}  # timed seconds per kind of step
run() {
    echo "+ bench/throughput.py $*"
    timeout 180 python3 bench/throughput.py --size gpu --seconds "$seconds" "$@" || echo "(failed: exit $?)"
}
date -u
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
run --batch 1280
run --batch 1280 --e2e "$shards" --workers "$workers"
run --batch 1280 --e2e "$shards" --workers "$workers" --decode device
run
run --e2e "$shards" --workers "$workers"
run --e2e "$shards" --workers "$workers" --decode device
run --e2e "$shards" --workers "$workers" --decode device --ahead 0 --modes frozen
run --modes frozen --compile
date -u
