#!/usr/bin/env bash
# Stop the cluster that tests/slurm/start_cluster.sh started (by its pid files: only those daemons)
# and remove its directory. Safe to run when nothing is running.
set -uo pipefail
dir=${IMCAP_SLURM_DIR:-/tmp/imcap-slurm}

for pidfile in "$dir"/slurmd-n1.pid "$dir"/slurmd-n2.pid "$dir"/slurmctld.pid "$dir"/munged.pid; do
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || continue
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && { echo "stop_cluster.sh: pid $pid ($pidfile) ignored SIGTERM for 10 s; killing it" >&2; kill -9 "$pid"; }
done
rm -rf "$dir"
