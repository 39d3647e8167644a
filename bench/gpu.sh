#!/usr/bin/env bash
# The GPU throughput check of bench/RESULTS.md: imcap against the straightforward reference step, bf16,
# 256 caption samples a step for both (51 images x 5 captions), 224 px, 20 decoder steps, frozen and
# layer4-trained encoder; first with batches already on the GPU (also at 1,280 caption samples a step,
# 256 images x 5, for both), then end to end from JPEG shards in memory (/dev/shm) through imcap's data path: the JPEGs
# decoded by the data workers, then on the GPU (data.jpeg_decode=device), then on the GPU in the
# training thread between steps (--ahead 0, no DeviceBatches thread); last, the decoder step compiled.
#   bash bench/gpu.sh SHARDS     # SHARDS: a directory of JPEG train shards with vocab.json (imcap shards build)
set -uo pipefail
shards=${1:?give a directory of JPEG train shards, e.g. built with imcap shards build}
workers=${WORKERS:-$(( $(nproc) - 2 ))}
date -u
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 bench/throughput.py --size gpu
python3 bench/throughput.py --size gpu --batch 1280
python3 bench/throughput.py --size gpu --e2e "$shards" --workers "$workers"
python3 bench/throughput.py --size gpu --e2e "$shards" --workers "$workers" --decode device
python3 bench/throughput.py --size gpu --e2e "$shards" --workers "$workers" --decode device --ahead 0
python3 bench/throughput.py --size gpu --modes frozen --compile || echo "torch.compile of the decoder step failed here"
