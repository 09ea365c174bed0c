"""``poeem train --nproc N``: the same command line run by N processes of torchrun.

The launcher runs torchrun's agent in its own process, so that its ranks are its children and
their fate is its own: a signal the launcher can catch (SIGTERM, SIGINT, SIGHUP, SIGQUIT) ends
every rank (torchrun's agent sends it on, and SIGKILL after 30 s), and a launcher killed by
SIGKILL takes its ranks with it (on Linux each rank asks the kernel for SIGTERM when its parent
ends: :func:`poeem.distributed.setup`). A rank's error reaches the user once: each rank leaves
its ``error:`` line in a folder of the launcher (:func:`report`), and the launcher prints each
distinct line once instead of torchrun's report of every failed rank.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

RANK_ERRORS = "POEEM_RANK_ERRORS"  # the launcher's folder for its ranks' error lines


def report(line: str) -> None:
    """Print an ``error:`` (or ``interrupted``) line on stderr; a rank of the ``--nproc`` launcher
    leaves it to the launcher instead, which prints each distinct line once."""
    folder, rank = os.environ.get(RANK_ERRORS), os.environ.get("RANK")
    if folder and rank is not None:
        try:
            Path(folder, f"rank-{int(rank):06d}.txt").write_text(line)
            return
        except (OSError, ValueError):
            pass  # the launcher is gone: print it here
    print(line, file=sys.stderr)


def relaunch_with_torchrun(nproc: int) -> int:
    """Run this same command line as ``torchrun --standalone --nproc-per-node N -m poeem ...``,
    without its ``--nproc`` option, torchrun's agent in this process (see the module doc).

    Returns:
        0 when every rank finished; 2 when ranks stopped on a clear error (printed here once);
        1 when a rank crashed (its traceback is above); 128 + the signal that stopped the launcher.
    """
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            args.append(arg)
    torchrun = ["--standalone", f"--nproc-per-node={nproc}"]
    print(f"launching {nproc} processes: torchrun {' '.join(torchrun)} -m poeem ...", flush=True)
    # the agent's own line per failed rank would repeat what the ranks or this launcher print
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # what torchrun sets, without its banner
    with tempfile.TemporaryDirectory(prefix="poeem-ranks-") as errors:
        os.environ[RANK_ERRORS] = errors
        try:
            run(get_args_parser().parse_args([*torchrun, "-m", "poeem", *args]))
        except ChildFailedError as failed:
            return _failed(failed, Path(errors))
        except SignalException as stopped:
            ended = f"stopped by {stopped.sigval.name}: every process ended (checkpoints are intact)"
            print(ended, file=sys.stderr)
            return 128 + int(stopped.sigval)
        finally:
            del os.environ[RANK_ERRORS]
    return 0


def _failed(failed: ChildFailedError, errors: Path) -> int:
    """Print what the failed ranks of a torchrun ``ChildFailedError`` left, each line once, and
    a line for each rank that left none; returns the launcher's exit code."""
    lines = [p.read_text() for p in sorted(errors.glob("rank-*.txt"))]
    for line in dict.fromkeys(lines):
        print(line, file=sys.stderr)
    silent = [
        (rank, f)
        for rank, f in sorted(failed.failures.items())
        if not (errors / f"rank-{rank:06d}.txt").is_file()
    ]
    for rank, f in silent:
        how = f"by {f.signal_name()}" if f.exitcode < 0 else f"with exit code {f.exitcode}"
        print(f"error: process {rank} (pid {f.pid}) ended {how}; its output is above", file=sys.stderr)
    return 1 if silent or not lines else 2
