"""`peftkit run --processes N`: the same command, started in N processes by torchrun's launcher (the library
behind the `torchrun` command), each process one data-parallel rank. What a user could type instead:

    torchrun --standalone --nproc-per-node N -m peftkit run RECIPE          (CPU processes or GPUs)
    accelerate launch --multi_gpu --num_processes N -m peftkit run RECIPE   (torchrun underneath; CPU too)
    accelerate launch --config_file CONFIG -m peftkit run RECIPE            (GPUs: DDP, FSDP, DeepSpeed)

`accelerate launch --cpu --num_processes N` starts a single process (accelerate 1.15 starts several CPU
processes through mpirun only), hence torchrun's launcher here. It is used as a library rather than as the
`torchrun` command so that a process's exit code (2: a user error) reaches the caller.
"""

import logging
import os
import sys
import uuid

from peftkit.errors import UserError

log = logging.getLogger("peftkit")
LAUNCHED = "PEFTKIT_LAUNCHED"  # set for the processes that launch() starts


def die_with_launcher() -> None:
    """In a process started by launch(): be killed when the launcher dies. torchrun starts each process in a
    session of its own, so a SIGKILL of the launcher (which cannot pass it on) would leave them training."""
    if os.environ.get(LAUNCHED) and sys.platform == "linux":
        import ctypes
        import signal

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def launch(processes: int, args: list[str]) -> int:
    """Run `peftkit ARGS` in `processes` processes on this machine; the exit code of the job: 0, 2 when a
    process stopped on a user error (it printed the message), else the first failing process's code."""
    import torch
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        # torchrun would give each process 1 thread; on CPU the cores are shared between the processes instead
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
    elif torch.cuda.is_available() and torch.cuda.device_count() < processes:  # NCCL takes one GPU per process
        count = torch.cuda.device_count()
        raise UserError(f"--processes {processes}: this machine has {count} GPU(s); use --processes {count} or fewer")
    # the agent's own log lines repeat what the failing process printed; its exit code is reported below
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
    try:
        elastic_launch(config, sys.executable)("-m", "peftkit", *args)
    except ChildFailedError as err:
        codes = [failure.exitcode for failure in err.failures.values()]
        if 2 in codes:
            return 2
        code = next((c for c in codes if c), 1)
        return 128 - code if code < 0 else code  # killed by signal N: the shell's 128 + N
    return 0
