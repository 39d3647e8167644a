#!/usr/bin/env bash
# Start a real Slurm cluster on this one machine for tests/test_slurm.py: munge, slurmctld, and two
# slurmd "nodes" n1 and n2, both at 127.0.0.1, from Debian's packages (installed here when missing).
# Run as root. Everything it writes goes into $IMCAP_SLURM_DIR (default /tmp/imcap-slurm);
# tests/slurm/stop_cluster.sh stops the daemons and removes that directory.
# Clients reach this cluster, and no other, through SLURM_CONF:
#     export SLURM_CONF=/tmp/imcap-slurm/slurm.conf; sinfo
# Each setting below says why it is there; docs/testing.md says what the Slurm tests run.
set -euo pipefail
dir=${IMCAP_SLURM_DIR:-/tmp/imcap-slurm}
export SLURM_CONF=$dir/slurm.conf

fail() { echo "start_cluster.sh: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || fail "must run as root (the daemons run as root and munged as user munge)"
if [ -f "$dir/slurmctld.pid" ] && kill -0 "$(cat "$dir/slurmctld.pid")" 2>/dev/null; then
    fail "a test cluster is already running from $dir: stop it first with tests/slurm/stop_cluster.sh"
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    # Package scripts would start the daemons before any config exists; policy-rc.d forbids that.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi

rm -rf "$dir"
mkdir -p "$dir/state" "$dir/spool" "$dir/log"

# munge authenticates every Slurm message. Use the machine's munged when one answers; otherwise
# start one and note its pid so that stop_cluster.sh stops only what was started here.
if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    install -d -o munge -g munge -m 0755 /run/munge
    runuser -u munge -- /usr/sbin/munged
    cp /run/munge/munged.pid "$dir/munged.pid"
    munge -n </dev/null | unmunge >/dev/null || fail "munged started but does not answer: see /var/log/munge/munged.log"
fi

# A requeued job waits cred_expire + 1 s before it starts again (the old run's credential must have
# expired on the nodes): 10 s here, not the default 120, so that tests need not release it by hand
# (`scontrol update StartTime=now` right after a requeue can meet "Job credential revoked"). Then the
# next scheduling pass starts it: every second here, not every 30-60 s.
# No cgroups or systemd here: linuxproc tracks a job's processes, task/none binds nothing. Two slurmd
# on one host need their own ports, spool dirs and pid files (%n is the node name); the node names
# do not resolve, so NodeAddr gives the address.
host=$(hostname -s)
cpus=$(nproc)
# slurmctld's and the two slurmd's ports: free ones picked now (bound to port 0 and read back, all three
# held at once so they differ), not fixed ones another cluster or server on this machine may hold.
ports=$(python3 -c 'import socket
held = [socket.socket() for _ in range(3)]
for s in held:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in held))') || fail "python3 is needed to pick free ports"
read -r ctld_port n1_port n2_port <<<"$ports"
cat > "$SLURM_CONF" <<CONF
ClusterName=imcap-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=sched_interval=1,bf_interval=1
MpiDefault=none
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=600
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
NodeName=n1 NodeHostname=$host NodeAddr=127.0.0.1 Port=$n1_port CPUs=$cpus RealMemory=1000 State=UNKNOWN
NodeName=n2 NodeHostname=$host NodeAddr=127.0.0.1 Port=$n2_port CPUs=$cpus RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
CONF

slurmctld -c   # -c: a clean start, no jobs left from an earlier cluster
slurmd -N n1
slurmd -N n2

for _ in $(seq 60); do
    [ "$(sinfo -h -N -o '%N %T' 2>/dev/null | tr '\n' ' ')" = "n1 idle n2 idle " ] && {
        echo "Slurm test cluster up: nodes n1 n2 idle; export SLURM_CONF=$SLURM_CONF"; exit 0; }
    sleep 0.5
done
tail -n 20 "$dir"/log/*.log >&2
fail "nodes n1 and n2 did not become idle within 30 s (sinfo: $(sinfo -h -N -o '%N %T' 2>&1 | tr '\n' ' ')); daemon logs above"
