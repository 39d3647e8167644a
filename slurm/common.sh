# Sourced by slurm/train.sbatch and slurm/multinode.sbatch, and by each node's task of a multi-node job:
# the settings, the `accelerate launch` command for this node, passing Slurm's signals on, the requeue.
#
# Settings: environment variables, read when the job starts (export them before sbatch; sbatch passes
# the environment on). Unset means the default shown.
#   IMCAP_ROOT            the imcap checkout to run in                  [the directory sbatch was run in]
#   IMCAP_CONFIG          config file, relative to IMCAP_ROOT           [configs/demo.yaml]
#   IMCAP_ACCELERATE      the accelerate command                        [$IMCAP_ROOT/.venv/bin/accelerate]
#   IMCAP_CPU             1: train on CPUs (DDP over gloo): CPU-only partitions, tests   [0]
#   IMCAP_PROCS_PER_NODE  training processes per node                   [the node's GPUs; 1 with IMCAP_CPU=1]
#   IMCAP_DATA_WORKERS    data-loading workers per process              [its share of the node's CPUs, less one]
#   IMCAP_PORT            rendezvous port on the first node             [20000 + job id % 10000]
# The job script's arguments are config overrides (key=value), after the ones made here, so they win;
# the run's name and directory are the overrides run_name=... and runs_dir=....

fail() {
    echo "imcap slurm: error: $*" >&2
    exit 2
}
[ -n "${SLURM_JOB_ID:-}" ] || fail "this is a Slurm job script: submit it with sbatch"

: "${IMCAP_ROOT:=$SLURM_SUBMIT_DIR}"
: "${IMCAP_CONFIG:=configs/demo.yaml}"
: "${IMCAP_ACCELERATE:=$IMCAP_ROOT/.venv/bin/accelerate}"
: "${IMCAP_CPU:=0}"
# Two jobs sharing a node must not both listen on accelerate's default port 29500.
: "${IMCAP_PORT:=$((20000 + SLURM_JOB_ID % 10000))}"
export IMCAP_ROOT IMCAP_CONFIG IMCAP_ACCELERATE IMCAP_CPU IMCAP_PORT  # for each node's task (srun)

node=${SLURMD_NODENAME:-$(hostname)}
cd "$IMCAP_ROOT" 2>/dev/null && [ -f launch/train.py ] ||
    fail "IMCAP_ROOT=$IMCAP_ROOT is not an imcap checkout (no launch/train.py there): run sbatch in the project's root or set IMCAP_ROOT"
[ -f "$IMCAP_CONFIG" ] || fail "IMCAP_CONFIG=$IMCAP_CONFIG: no such file in $IMCAP_ROOT"
command -v "$IMCAP_ACCELERATE" >/dev/null ||
    fail "IMCAP_ACCELERATE=$IMCAP_ACCELERATE is not a command on $node: create the venv (README, Quick start) or point IMCAP_ACCELERATE at accelerate"

# Sets launch_command: `accelerate launch` for this node's share of the job, then launch/train.py
# with the config and the overrides "$@".
build_launch_command() {
    local procs=${IMCAP_PROCS_PER_NODE:-}
    if [ -z "$procs" ]; then
        if [ "$IMCAP_CPU" = 1 ]; then
            procs=1
        else
            procs=${SLURM_GPUS_ON_NODE:-0}
            [ "$procs" -gt 0 ] || fail "job $SLURM_JOB_ID has no GPUs on $node: ask sbatch for them (--gpus-per-node=N) or set IMCAP_CPU=1 to train on CPUs"
        fi
    fi
    local nodes=${SLURM_NNODES:-1}
    local cpus_per_proc=$((SLURM_CPUS_ON_NODE / procs > 0 ? SLURM_CPUS_ON_NODE / procs : 1))
    # One core per process is the process's own; the rest of its share decodes data.
    local workers=${IMCAP_DATA_WORKERS:-$((cpus_per_proc - 1))}
    # Torch threads from the job's CPUs, not the node's: without CPU binding (TaskPlugin=task/none)
    # a process sees every core of a node it may share with other jobs.
    local threads=$((cpus_per_proc - workers > 0 ? cpus_per_proc - workers : 1))
    # accelerate's --num_processes counts every machine's processes.
    launch_command=("$IMCAP_ACCELERATE" launch --num_processes $((procs * nodes))
                    --num_cpu_threads_per_process "$threads" --main_process_port "$IMCAP_PORT")
    # Without --multi_gpu, accelerate starts one process whatever --num_processes says.
    [ $((procs * nodes)) -gt 1 ] && launch_command+=(--multi_gpu)
    if [ "$nodes" -gt 1 ]; then
        # SLURM_NODEID is read here, on each node: expanded on the submitting node, every node would be rank 0.
        launch_command+=(--num_machines "$nodes" --machine_rank "$SLURM_NODEID" --main_process_ip "$IMCAP_MAIN_ADDR")
    fi
    launch_command+=(launch/train.py --config "$IMCAP_CONFIG" "data.num_workers=$workers" "train.cpu_threads=$threads")
    # train.cpu=true is what makes --multi_gpu start real CPU processes: without it, on a node without GPUs,
    # accelerate silently starts a single process (README, Training on several processes).
    [ "$IMCAP_CPU" = 1 ] && launch_command+=(train.cpu=true)
    launch_command+=("$@")
    echo "imcap slurm: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $node: machine rank ${SLURM_NODEID:-0} of $nodes," \
         "$procs process(es) here, $((procs * nodes)) in all, rendezvous ${IMCAP_MAIN_ADDR:-localhost}:$IMCAP_PORT," \
         "$workers data worker(s) and $threads torch thread(s) per process"
    echo "imcap slurm: ${launch_command[*]}"
}

# Runs the command "$2..." in the background and waits for it, passing SIGUSR1 (Slurm's warning
# before the time limit or a preemption) and SIGTERM on: to the command itself (srun passes signals
# to its tasks) or, with $1 = to-children, to its children (see pass_signal). Sets preemption_warned
# when SIGUSR1 came. Returns the command's exit status.
# In the background because bash runs a trap only between commands: a foreground command would hold
# the signal back until it ended.
run_passing_signals() {
    trap "preemption_warned=1; pass_signal USR1 $1" USR1
    trap "pass_signal TERM $1" TERM
    shift
    # The command starts with SIGUSR1 ignored (srun and the training processes set their own handlers):
    # accelerate would die of it and leave the training processes behind, and a signal to a job step
    # reaches the whole process group of each task, accelerate included.
    (trap '' USR1; exec "$@") &
    launcher=$!
    while kill -0 "$launcher" 2>/dev/null; do wait "$launcher"; done  # a trap ends `wait` early: wait again
    trap "" USR1 TERM  # from here a late signal must not end this shell before finish()
    wait "$launcher"  # bash keeps the exit status of a finished background process for this
}

# accelerate starts the training processes as its children, each in a session of its own, so a signal
# to its process group would miss them. Their own children (data workers, the METEOR scorer) must
# not get SIGUSR1: it would kill them.
pass_signal() {  # signal to-children|to-command
    local targets=${launcher:-}
    [ "$2" = to-children ] && [ -n "$targets" ] && targets=$(pgrep -d ' ' -P "$launcher")
    echo "imcap slurm: $node: SIG$1 received, passing it to ${targets:-nobody: training has not started yet}"
    [ -z "$targets" ] || kill "-$1" $targets 2>/dev/null || true  # one may have exited meanwhile
}

# The launcher's exit status cannot say "preempted": accelerate launch exits 1 when its processes exit
# with 75 (imcap's EXIT_PREEMPTED), as for any failure. So: requeue when this script passed SIGUSR1 on
# and training did not finish. A run that ends normally (0) is not requeued, nor one stopped by
# SIGTERM alone (scancel, or the time limit reached without a warning): that job is being ended.
# The requeued job starts the same script with the same arguments and resumes from
# runs/<name>/checkpoints/latest (resume: auto).
finish() {  # the launcher's exit status
    if [ -n "${preemption_warned:-}" ] && [ "$1" -ne 0 ]; then
        echo "imcap slurm: training stopped after SIGUSR1 (exit status $1); requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID" ||
            fail "could not requeue job $SLURM_JOB_ID (submitted with --no-requeue?): submit it again with the same settings to resume"
    fi
    exit "$1"
}
