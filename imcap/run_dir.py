"""Claiming a run directory before any work: one process at a time trains in it (a lock), and every place
the run will write is written to once at start, so an unwritable one fails the run in its first seconds
instead of at the first save, an epoch later.

    runs/<name>/.lock   held (flock) by the run's main process while it lives: its pid and host inside

flock locks belong to the open file: the kernel releases them when the process ends, however it ends,
so the lock of a killed run is free for the next one and never needs removing by hand.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
from pathlib import Path

from imcap.config import Config, ConfigError
from imcap.distributed import gather_objects
from imcap.metrics import temp_dir

log = logging.getLogger(__name__)
LOCK = ".lock"

_held: dict[Path, object] = {}  # run directory -> its open lock file: held for this process's life


class RunDirError(ConfigError):
    """A run directory (or a place the run writes) that this run cannot use: locked by another run, or unwritable."""


def claim_run_dir(cfg: Config, acc) -> None:
    """Lock cfg.run_dir for this run and check that every place it writes is writable, on every rank;
    -> RunDirError on every rank, naming the path (or the process that holds the lock), if not."""
    problem = _claim_on_main(cfg) if acc.is_main_process else None
    acc.wait_for_everyone()  # the directories exist: the other ranks check what they write themselves
    if problem is None and not acc.is_main_process:
        problem = unwritable(cfg.run_dir / "checkpoints", "every rank saves its RNG state there")
    problems = [p for p in gather_objects(acc, problem) if p]
    if problems:
        raise RunDirError(problems[0])


def check_writable(acc, directory: Path, why: str, remedy: str) -> None:
    """-> RunDirError on every rank if any rank cannot write in `directory` (made if missing)."""
    problems = [p for p in gather_objects(acc, unwritable(directory, why, remedy)) if p]
    if problems:
        raise RunDirError(problems[0])


def _claim_on_main(cfg: Config) -> str | None:
    """The lock and every check of the main process -> the first problem, or None."""
    run_dir = cfg.run_dir
    return (
        unwritable(run_dir, "the run directory: config, metrics and TensorBoard logs go there")
        or lock_run_dir(run_dir)
        or unwritable(run_dir / "checkpoints", "checkpoints are saved there")
        or _temp_dir_problem()
        or _unwritable_file(run_dir / "config.yaml")
        or _unwritable_file(run_dir / "metrics.jsonl")
    )


def _temp_dir_problem() -> str | None:
    try:  # gettempdir() takes the first writable of TMPDIR, /tmp, ...; with none, FileNotFoundError
        return unwritable(Path(temp_dir()), "the PTB tokeniser's input files go there", "set TMPDIR")
    except FileNotFoundError as e:
        return f"{e}: the PTB tokeniser's input files need one; set TMPDIR"


def lock_run_dir(run_dir: Path) -> str | None:
    """Take runs/<name>/.lock for this process (kept until it ends) -> None, or why it cannot be taken."""
    run_dir = Path(run_dir).resolve()
    if run_dir in _held:  # this process trains in it again (a test, a notebook): the lock is already ours
        return None
    path = run_dir / LOCK
    lock = open(path, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().split() or ["?", "?"]
        lock.close()
        return (
            f"{run_dir} is in use by another run: process {holder[0]} on {holder[-1]} holds {path}. "
            "Wait for it to end (or stop it), or set another run_name"
        )
    except OSError as e:  # a filesystem without flock (Lustre without -o flock): train, but say so
        log.warning("%s cannot be locked (%s): nothing stops a second run with this run_name", path, e.strerror)
    lock.truncate(0)
    lock.write(f"{os.getpid()} {socket.gethostname()}\n")
    lock.flush()
    _held[run_dir] = lock
    return None


def unwritable(directory: Path, why: str, remedy: str = "make it writable or set runs_dir") -> str | None:
    """None if a file can be created in `directory` (made if missing) and removed again; else why not."""
    probe = Path(directory) / f".write-probe-{socket.gethostname()}-{os.getpid()}"
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
        with open(probe, "x") as f:
            f.write("probe")
        probe.unlink()
    except OSError as e:
        return f"{directory} cannot be written ({why}): {e.strerror or e}; {remedy}"
    return None


def _unwritable_file(path: Path) -> str | None:
    """None if the existing file at `path` (if any) can be opened for writing; else why not."""
    try:
        if path.exists():
            open(path, "a").close()
    except OSError as e:
        return f"{path} cannot be written (this run appends to or replaces it): {e.strerror or e}"
    return None
