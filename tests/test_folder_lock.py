"""One writer per run or index folder (``writer.lock``), and the ``--nproc`` launcher that ends its
ranks when it is stopped."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist
from conftest import run_ranks, tiny_config, tiny_run

from poeem import PoeemError, folder_lock
from poeem.folder_lock import LOCK_FILE, FolderLock, folder_writer, writer_of

HOLD = (
    "import sys, time; from pathlib import Path; from poeem.folder_lock import FolderLock\n"
    "FolderLock(Path(sys.argv[1]), 'poeem train'); print('held', flush=True); time.sleep(120)\n"
)


@pytest.fixture()
def holder(tmp_path: Path) -> subprocess.Popen:
    """Another process holding the lock of ``tmp_path / "run"`` (killed by -9 at the end)."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None and process.stdout.readline() == "held\n"
    yield process
    process.kill()
    process.wait()


def dead_pid() -> int:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(done.stdout)


def write_owner(folder: Path, pid: int, host: str = socket.gethostname()) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    owner = {"pid": pid, "host": host, "command": "poeem train", "started": "2026-01-01T00:00:00"}
    (folder / LOCK_FILE).write_text(json.dumps(owner))


def test_a_second_writer_is_refused_with_the_owners_pid_and_host(
    holder: subprocess.Popen, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    assert writer_of(run).pid == holder.pid
    expected = (
        f"'{run}': expected a folder no other process writes, got a lock held by pid {holder.pid} on host "
        f"'{socket.gethostname()}' ('poeem train', since "
    )
    with pytest.raises(PoeemError) as err:
        FolderLock(run, "poeem train --resume")
    assert str(err.value).startswith(expected)
    assert str(err.value).endswith(
        f"Fix: wait for that process to end, or end it ('kill {holder.pid}'), then run this again"
    )
    with pytest.raises(PoeemError, match=f"lock held by pid {holder.pid}"):
        tiny_run(tmp_path)  # poeem train
    assert not (run / "config.json").exists()  # refused before writing anything


def test_a_lock_whose_process_was_killed_is_taken_over_with_a_warning(
    holder: subprocess.Popen, tmp_path: Path
) -> None:
    holder.kill()
    holder.wait()  # killed: it could not delete its lock file
    run = tmp_path / "run"
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == holder.pid
    assert writer_of(run) is None
    with pytest.warns(
        UserWarning, match=f"locked by pid {holder.pid} .* which has ended: 'poeem train' takes"
    ):
        lock = FolderLock(run, "poeem train")
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (run / LOCK_FILE).exists()


@pytest.mark.parametrize("flock", [True, False], ids=["flock", "no flock"])
def test_a_stale_lock_of_this_host_is_taken_over_and_a_live_one_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flock: bool
) -> None:
    if not flock:  # a file system without flock: the pid alone decides
        monkeypatch.setattr(folder_lock, "_flock", lambda fd: None)
    write_owner(tmp_path, dead_pid())
    with pytest.warns(UserWarning, match="which has ended"):
        FolderLock(tmp_path, "poeem export").release()
    if not flock:
        write_owner(tmp_path, os.getppid())  # a live process of this host (pytest's parent)
        with pytest.raises(PoeemError, match=f"lock held by pid {os.getppid()}"):
            FolderLock(tmp_path, "poeem export")


def test_a_lock_of_another_host_is_refused_until_deleted(tmp_path: Path) -> None:
    write_owner(tmp_path, 1234, host="elsewhere")
    with pytest.raises(
        PoeemError, match=f"host 'elsewhere'.* Fix: if it has ended, delete '{tmp_path / LOCK_FILE}'"
    ):
        FolderLock(tmp_path, "poeem train")
    (tmp_path / LOCK_FILE).unlink()
    FolderLock(tmp_path, "poeem train").release()


def test_a_folder_made_for_the_lock_alone_is_removed_with_it(tmp_path: Path) -> None:
    FolderLock(tmp_path / "new", "poeem export").release()
    assert not (tmp_path / "new").exists()
    (tmp_path / "kept").mkdir()
    FolderLock(tmp_path / "kept", "poeem export").release()
    assert (tmp_path / "kept").is_dir() and not list((tmp_path / "kept").iterdir())


def test_training_holds_the_run_folders_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from poeem.pipeline import train_run
    from poeem.training.trainer import Trainer

    seen, fit = [], Trainer.fit
    monkeypatch.setattr(
        Trainer, "fit", lambda self, batches: seen.append(writer_of(tmp_path / "run")) or fit(self, batches)
    )
    train_run(tiny_config(), tmp_path / "run")
    assert seen[0].pid == os.getpid() and seen[0].command == "poeem train"
    assert not (tmp_path / "run" / LOCK_FILE).exists()  # given back at the end


def test_an_export_to_an_index_directory_another_process_writes_is_refused(
    holder: subprocess.Popen, tmp_path: Path
) -> None:
    from poeem.pipeline import export_run

    run = tiny_run(tmp_path / "trained")
    with pytest.raises(PoeemError, match=f"lock held by pid {holder.pid}"):
        export_run(run, tmp_path / "run", replace=True)  # the folder the holder writes


def lock_worker(out: str, *folders: str) -> None:
    answers = []
    for folder in folders:
        try:
            with folder_writer(folder, "poeem train"):
                answers.append("held")
        except PoeemError as err:
            answers.append(str(err))
    Path(out, f"rank{dist.get_rank()}.json").write_text(json.dumps(answers))


def test_every_rank_gets_rank_0s_answer(holder: subprocess.Popen, tmp_path: Path) -> None:
    run_ranks(lock_worker, str(tmp_path), str(tmp_path / "run"), str(tmp_path / "free"))  # the holder's run
    answers = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert answers[0] == answers[1]
    assert f"lock held by pid {holder.pid}" in answers[0][0] and answers[0][1] == "held"


# ------------------------------------------------------------------ launcher
TINY = (
    *("--data", "synthetic", "--num-pairs", "4000", "--dim", "16", "--no-poeem", "--batch-size", "64"),
    *("--epochs", "100000", "--no-progress", "--logger", "none", "--checkpoint-every", "0"),
)


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc/*/stat: field 4 is the parent)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def gone(pid: int) -> bool:
    """Whether a process has ended (or is a zombie waiting for a parent that does not reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_stopping_the_launcher_ends_its_ranks(tmp_path: Path, sig: signal.Signals) -> None:
    run = tmp_path / "run"
    command = [sys.executable, "-m", "poeem", "train", "--run-dir", str(run), *TINY, "--nproc", "2"]
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert launcher.stdout is not None
    for line in launcher.stdout:  # rank 0 holds the lock and trains
        if line.startswith("training a"):
            break
    else:
        raise AssertionError(launcher.stderr.read())
    ranks = children(launcher.pid)
    try:
        assert len(ranks) == 2 and writer_of(run).pid in ranks
        launcher.send_signal(sig)
        launcher.wait(timeout=60)
        deadline = time.monotonic() + 30
        while not all(gone(pid) for pid in ranks) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(gone(pid) for pid in ranks)
    finally:
        for pid in ranks:  # a failed test leaves no rank behind
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30  # the kernel lets the lock go once the last holder has exited
    while writer_of(run) is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert writer_of(run) is None  # the lock file stays, but no process holds it: the next writer takes it
    if sig == signal.SIGTERM:
        assert launcher.returncode == 128 + sig
        assert "stopped by SIGTERM: every process ended" in launcher.stderr.read()


def test_a_folder_that_cannot_be_made_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(PoeemError, match=r"expected a folder this process can write, got .*File exists"):
        FolderLock(tmp_path / "file", "poeem train")
