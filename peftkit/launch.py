"""`peftkit run --processes N`: the same command, started in N processes by torchrun's launcher (the library
behind the `torchrun` command), each process one data-parallel rank. What a user could type instead:

    torchrun --standalone --nproc-per-node N -m peftkit run RECIPE          (CPU processes or GPUs)
    accelerate launch --multi_gpu --num_processes N -m peftkit run RECIPE   (torchrun underneath; CPU too)
    accelerate launch --config_file CONFIG -m peftkit run RECIPE            (GPUs: DDP, FSDP, DeepSpeed)

`accelerate launch --cpu --num_processes N` starts a single process (accelerate 1.15 starts several CPU
processes through mpirun only), hence torchrun's launcher here. It is used as a library rather than as the
`torchrun` command so that a process's exit code (2: a user error) reaches the caller, and so that a failed job is
reported as a single-process run reports it: when one process fails, the others die of it (a collective whose peer
is gone: gloo's "Connection closed by peer"), or are stopped by the launcher. Each process that launch() started
keeps its error to itself (record_failure: a file in a folder the launcher made) instead of printing a traceback
among the others'; the launcher then names the process that failed first, with its error, and what became of
the rest.
"""

import json
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import traceback
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from peftkit.errors import UserError

log = logging.getLogger("peftkit")
LAUNCHED = "PEFTKIT_LAUNCHED"  # set for the processes that launch() starts
FAILURES = "PEFTKIT_FAILURES"  # the folder where they record how they failed (record_failure)


class ProcessFailed(Exception):
    """A launched job whose first failing process did not stop on a user error. str(): that process and its error
    in one line; `details`: its traceback and what became of the other processes; `code`: the job's exit code."""

    def __init__(self, summary: str, details: str, code: int):
        super().__init__(summary)
        self.details, self.code = details, code


@dataclass
class _Failure:
    rank: int
    time: float
    code: int  # the process's exit code as a shell gives it (2: a user error; 128 + N: ended by signal N)
    cause: int  # how likely it is the job's cause, 0 the likeliest (CAUSES): what orders failures of one moment
    message: str  # one line: the error's type and message, or the signal that ended the process
    user_error: bool = False  # a UserError: its message is the whole story
    traceback: str = ""


# A process's own error is a cause; a process that died by a signal (SIGKILL: the out-of-memory killer), or exited
# without a record, left the others without a peer; an error in a collective ("Connection closed by peer") is the
# others' reaction to that; SIGTERM is the launcher stopping the rest.
CAUSES = ("error", "signal", "collective", "stopped")
COLLECTIVE = re.compile(r"gloo/transport|Connection (closed|reset) by peer|NCCL (error|communicator)")


def launched() -> bool:
    """Whether this process is one that launch() started."""
    return bool(os.environ.get(LAUNCHED))


def record_failure(err: BaseException) -> bool:
    """In a process that launch() started: record `err` for the launcher, which reports it (True); False elsewhere
    (the caller prints it as usual)."""
    folder = os.environ.get(FAILURES)
    if not folder:
        return False
    user = isinstance(err, UserError)
    dist = sys.modules.get("torch.distributed")  # imported by now wherever a collective can have failed
    # gloo raises a plain RuntimeError when a peer is gone (from DDP's gradient hook, say), hence the message too
    collective = (dist is not None and isinstance(err, dist.DistError)) or bool(COLLECTIVE.search(str(err)))
    rank = int(os.environ.get("RANK", "0"))
    failure = _Failure(
        rank=rank,
        time=time.time(),
        code=2 if user else 1,
        cause=CAUSES.index("collective" if collective else "error"),
        message=str(err) if user else f"{type(err).__name__}: {err}",
        user_error=user,
        traceback="" if user else "".join(traceback.format_exception(err)),
    )
    try:
        path = Path(folder) / f"rank-{rank}.json"
        path.with_suffix(".tmp").write_text(json.dumps(asdict(failure)))
        path.with_suffix(".tmp").replace(path)  # whole or not at all
    except OSError:
        return False
    return True


def die_with_launcher() -> None:
    """In a process started by launch(): be killed when the launcher dies. torchrun starts each process in a
    session of its own, so a SIGKILL of the launcher (which cannot pass it on) would leave them training."""
    if launched() and sys.platform == "linux":
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def launch(processes: int, args: list[str]) -> None:
    """Run `peftkit ARGS` in `processes` processes on this machine. When one fails, raises the error of the process
    that failed first (the job's cause): its UserError (exit 2), else ProcessFailed."""
    import torch
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        # torchrun would give each process 1 thread; on CPU the cores are shared between the processes instead
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
    elif torch.cuda.is_available() and torch.cuda.device_count() < processes:  # NCCL takes one GPU per process
        count = torch.cuda.device_count()
        raise UserError(f"--processes {processes}: this machine has {count} GPU(s); use --processes {count} or fewer")
    # the agent logs each failure as it sees it; _report says which process failed first, and why
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=processes,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",  # torchrun --standalone
        max_restarts=0,
    )
    os.environ[LAUNCHED] = "1"
    folder = tempfile.mkdtemp(prefix="peftkit-failures-")
    os.environ[FAILURES] = folder
    try:
        elastic_launch(config, sys.executable)("-m", "peftkit", *args)
    except ChildFailedError as err:
        # local rank = rank: one machine. A process with no record was ended by a signal (or exited without a word).
        exits = {failure.local_rank: (failure.exitcode, failure.timestamp) for failure in err.failures.values()}
        _report(_failures(Path(folder), exits), processes)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        del os.environ[FAILURES]


def _failures(folder: Path, exits: dict[int, tuple[int, float]]) -> list[_Failure]:
    """Every failed process's failure, the job's likeliest cause first: its own record, else what its exit code
    says (`exits`: rank -> exit code, when the launcher saw it)."""
    failures = {}
    for path in folder.glob("rank-*.json"):
        failure = _Failure(**json.loads(path.read_text()))
        failures[failure.rank] = failure
    for rank, (code, when) in exits.items():
        if rank in failures:
            continue
        if code < 0:
            name = signal.Signals(-code).name
            cause = CAUSES.index("stopped" if name == "SIGTERM" else "signal")
            failures[rank] = _Failure(rank, when, 128 - code, cause, f"ended by {name}")
        else:
            failures[rank] = _Failure(rank, when, code, CAUSES.index("signal"), f"ended with exit code {code}")
    return sorted(failures.values(), key=lambda f: (f.cause, f.time, f.rank))


def _report(failures: list[_Failure], processes: int) -> None:
    """Raise the job's failure: the process that failed first, in plain words; a UserError as a UserError."""
    first, rest = failures[0], failures[1:]
    if first.user_error:
        raise UserError(first.message)
    summary = f"process {first.rank} of {processes} failed first: {first.message.splitlines()[0]}"
    then = ""
    if rest:
        others = "; ".join(f"process {f.rank}: {f.message.splitlines()[0]}" for f in rest)
        then = f"The other processes stopped after it ({others})."
    if first.message == "ended by SIGKILL":
        then += " On a CPU machine, a process killed without a word was most likely stopped by the kernel's "
        then += "out-of-memory killer: `peftkit estimate RECIPE --processes N` tells whether the run fits."
    raise ProcessFailed(summary, f"{first.traceback}{then}".strip(), first.code)
