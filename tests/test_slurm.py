"""slurm/*.sbatch on a real Slurm cluster: one node, two nodes, and preemption with requeue and resume.

The cluster (munge, slurmctld, slurmd "nodes" n1 and n2 on this machine) is started by
tests/slurm/start_cluster.sh. Without it these tests are skipped, saying so; with IMCAP_REQUIRE_SLURM=1
(as in .ci/run) they fail instead. Jobs train on CPUs (IMCAP_CPU=1), with gloo over loopback.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ROOT, free_port, run_env, tiny_overrides

pytestmark = pytest.mark.slurm

CLUSTER = Path(os.environ.get("IMCAP_SLURM_DIR", "/tmp/imcap-slurm"))
NODE_STATES_UP = {"idle", "mixed", "allocated", "completing"}
JOB_ENDED = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}


@pytest.fixture(scope="module")
def slurm_env() -> dict:
    """The environment for sbatch and scontrol: the test cluster's config, this interpreter's accelerate."""
    env = {
        **run_env(),
        "SLURM_CONF": str(CLUSTER / "slurm.conf"),
        "IMCAP_CPU": "1",
        "IMCAP_ACCELERATE": str(Path(sys.executable).parent / "accelerate"),
    }
    problem = cluster_problem(env)
    if problem:
        message = f"{problem}; start it with tests/slurm/start_cluster.sh (as root)"
        if os.environ.get("IMCAP_REQUIRE_SLURM") == "1":
            pytest.fail(f"IMCAP_REQUIRE_SLURM=1, but {message}", pytrace=False)
        pytest.skip(message)
    return env


def cluster_problem(env: dict) -> str | None:
    if shutil.which("sbatch") is None:
        return "Slurm is not installed (no sbatch on PATH)"
    if not Path(env["SLURM_CONF"]).exists():
        return f"no Slurm test cluster: {env['SLURM_CONF']} does not exist"
    sinfo = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=env, capture_output=True, text=True, timeout=60)
    states = dict(line.split() for line in sinfo.stdout.splitlines())
    if sinfo.returncode or not all(states.get(node, "").rstrip("*") in NODE_STATES_UP for node in ("n1", "n2")):
        found = f"{sinfo.stdout}{sinfo.stderr}"
        return f"the Slurm test cluster at {env['SLURM_CONF']} has no nodes n1 and n2 up (sinfo: {found})"
    return None


@pytest.fixture
def jobs(slurm_env):
    """Job ids submitted by a test; any still there when it ends are cancelled."""
    submitted = []
    yield submitted
    for job_id in submitted:
        subprocess.run(["scancel", job_id], env=slurm_env, capture_output=True)


def sbatch(env: dict, jobs: list, *args: str) -> str:
    """sbatch *args in the project's root; the job's id. The job's rendezvous port (IMCAP_PORT) is one free
    now, not slurm/common.sh's 20000 + job id: every fresh test cluster numbers its jobs from 1 again."""
    command = ["sbatch", "--parsable", *args]
    submitted = subprocess.run(
        command, cwd=ROOT, env={"IMCAP_PORT": str(free_port()), **env}, capture_output=True, text=True
    )
    assert submitted.returncode == 0, f"{' '.join(command)} failed: {submitted.stderr}"
    jobs.append(submitted.stdout.strip().split(";")[0])
    return jobs[-1]


def job(env: dict, job_id: str) -> dict:
    """`scontrol show job` as a dict: JobState, Restarts, ExitCode, ..."""
    out = subprocess.run(
        ["scontrol", "-o", "show", "job", job_id], env=env, capture_output=True, text=True, check=True
    ).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_for(condition, what: str, timeout: float = 600):
    """Polls until condition() holds; the timeout only keeps a broken run from hanging the suite."""
    deadline = time.time() + timeout
    while not (result := condition()):
        if time.time() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.5)
    return result


def ended(env: dict, job_id: str) -> dict:
    """The job's `scontrol show job` once it has ended. (Like sbatch --wait, whose polls back off to 30 s.)"""
    return wait_for(lambda: (info := job(env, job_id))["JobState"] in JOB_ENDED and info, f"job {job_id} to end")


def job_overrides(shards: Path, runs: Path, *extra: str) -> list[str]:
    """The tiny demo run, every step logged, the evaluations small."""
    return tiny_overrides(
        shards, runs, "train.log_every=1", "eval.max_images=8", "model.encoder.feature_stats_images=0", *extra
    )


def logged_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line)["step"] for line in lines if '"train_loss"' in line]


def latest_state(run: Path) -> dict:
    checkpoints = run / "checkpoints"
    return json.loads((checkpoints / (checkpoints / "latest").read_text() / "state.json").read_text())


def readable(log: Path) -> str:
    """The job's log without its progress bars (a line may go on after one: "...| 4/12 [...]stopped by ...")."""
    text = re.sub(r"\d+%\|[^|\n]*\|[^\]\n]*\]", "", log.read_text(errors="replace").replace("\r", "\n"))
    return "\n".join(line for line in text.splitlines() if line.strip())


def search(pattern: str, text: str) -> re.Match:
    match = re.search(pattern, text, re.M)
    assert match, f"{pattern!r} is not in the job's log:\n{text[-6000:]}"
    return match


ONE_NODE = ("slurm/train.sbatch", ["--cpus-per-task=2"], {"IMCAP_PROCS_PER_NODE": "2"})
TWO_NODES = ("slurm/multinode.sbatch", ["--nodes=2", "--cpus-per-task=1"], {})


def test_one_node_job_trains_two_cpu_processes_to_the_end_and_is_not_requeued(slurm_env, jobs, demo_shards, tmp_path):
    script, resources, settings = ONE_NODE
    log = tmp_path / "job.out"
    job_id = sbatch(
        {**slurm_env, **settings}, jobs, *resources, f"--output={log}", script, *job_overrides(demo_shards, tmp_path)
    )
    info = ended(slurm_env, job_id)
    assert (info["JobState"], info["Restarts"], info["ExitCode"]) == ("COMPLETED", "0", "0:0"), readable(log)[-6000:]
    run = tmp_path / "tiny"
    assert logged_steps(run) == list(range(1, 7))  # 96 images / (8 a batch x 2 processes)
    assert latest_state(run)["step"] == 6 and latest_state(run)["world_size"] == 2
    assert (run / "config.yaml").exists()


def test_two_node_job_gives_each_node_its_machine_rank_and_trains_one_world_of_two(
    slurm_env, jobs, demo_shards, tmp_path
):
    """Asked as a site might: tasks as for one per GPU (3: n1 gets 2 CPUs, n2 1) and only some variables
    exported. The job still runs one launcher per node, with all of that node's CPUs and its settings."""
    log = tmp_path / "job.out"
    job_id = sbatch(
        slurm_env,
        jobs,
        "--nodes=2",
        "--ntasks=3",
        "--ntasks-per-node=2",
        "--export=IMCAP_CPU,IMCAP_ACCELERATE,IMCAP_PORT,OMP_NUM_THREADS,PYTHONUNBUFFERED",
        f"--output={log}",
        "slurm/multinode.sbatch",
        *job_overrides(demo_shards, tmp_path),
    )
    info = ended(slurm_env, job_id)
    text = readable(log)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), text[-6000:]
    # srun --label puts the task (= node) number before each line of the log
    search(r"^0: imcap slurm: job \d+ \(restart 0\) on n1: machine rank 0 of 2,", text)
    search(r"^1: imcap slurm: job \d+ \(restart 0\) on n2: machine rank 1 of 2,", text)
    assert len(re.findall(r"^\d: imcap slurm: job \d+ \(restart 0\)", text, re.M)) == 2, text[-6000:]
    # each node's process: in a world of 2, on the CPUs its node gave the job (n1: 1 decodes, 1 trains)
    for node in "01":
        search(rf"^{node}: 96 train images, \d+ words, 2 process\(es\) of 1 CPU thread\(s\),", text)
    run = tmp_path / "tiny"
    assert logged_steps(run) == list(range(1, 7))
    assert latest_state(run)["step"] == 6 and latest_state(run)["world_size"] == 2


@pytest.mark.parametrize("script, resources, settings", [ONE_NODE, TWO_NODES], ids=["one-node", "two-nodes"])
def test_preemption_signal_saves_requeues_and_the_job_resumes_to_the_end_training_no_step_twice(
    slurm_env, jobs, script, resources, settings, demo_shards, tmp_path
):
    log, run = tmp_path / "job.out", tmp_path / "tiny"
    job_id = sbatch(
        {**slurm_env, **settings},
        jobs,
        *resources,
        f"--output={log}",
        script,
        *job_overrides(demo_shards, tmp_path, "train.epochs=2"),
    )

    def training_at_step_3():
        assert job(slurm_env, job_id)["JobState"] not in JOB_ENDED, (
            f"the job ended before it could be signalled:\n{readable(log)[-6000:]}"
        )
        return any(step >= 3 for step in logged_steps(run))

    wait_for(training_at_step_3, "step 3")
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], env=slurm_env, check=True)
    # The requeued job starts again by itself, once Slurm's hold on it ends (cred_expire in start_cluster.sh).
    final = ended(slurm_env, job_id)

    text = readable(log)
    assert (final["JobState"], final["Restarts"], final["ExitCode"]) == ("COMPLETED", "1", "0:0"), text[-6000:]
    stopped = int(search(r"stopped by SIGUSR1 at step (\d+); checkpoint saved", text)[1])
    assert 3 <= stopped < 12
    # The launcher outlived the signal and exited after its training processes, with a status of its own (not 128+n).
    status = int(search(r"training stopped after SIGUSR1 \(exit status (\d+)\); requeueing job", text)[1])
    assert 0 < status < 128, text[-6000:]
    search(rf"resumed from \S+/step-{stopped:06d} at step {stopped} ", text)
    search(r"imcap slurm: job \d+ \(restart 1\)", text)  # both runs in the one log (--open-mode=append)
    assert logged_steps(run) == list(range(1, 13))  # every step once: none lost, none trained twice
    assert latest_state(run)["step"] == 12
