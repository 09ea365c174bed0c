"""A newcomer's first afternoon: the README's main command run twice, errors whose
fixes name real options, and the CLI's edges (short rows, exclusions, embed, publish)."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import typer
from click.testing import Result
from conftest import assert_same_topk, table_config, tiny_config, write_table
from typer.testing import CliRunner

from poeem import PoeemError, Searcher
from poeem.cli import app
from poeem.pipeline import export_run, load_run, train_run

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture(scope="module")
def run_and_index(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A finished tiny synthetic run (2 lists, integer ids) and its exported index."""
    tmp = tmp_path_factory.mktemp("newcomer")
    train_run(tiny_config(), tmp / "run")
    export_run(tmp / "run", tmp / "ix")
    return tmp / "run", tmp / "ix"


def cli(*args: object) -> Result:
    return runner.invoke(app, [str(a) for a in args])


def ok(*args: object) -> str:
    result = cli(*args)
    assert result.exit_code == 0, (result.output, result.exception)
    return result.stdout


def failure(*args: object) -> str:
    """The message of the PoeemError a command ends with."""
    result = cli(*args)
    assert isinstance(result.exception, PoeemError), (result.output, result.exception)
    return str(result.exception)


# ---------------------------------------------------------------- the README's main command
def readme_main_command() -> list[str]:
    """The part of the README's first command that runs the main job (after the install)."""
    first = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    command = next(line for line in first.splitlines() if line and not line.startswith("#"))
    main = command.split("&&")[-1].strip()
    assert main == ".venv/bin/poeem demo", command
    return shlex.split(main)[1:]


def test_the_readme_main_command_runs_twice_in_one_fresh_folder(tmp_path: Path) -> None:
    args = [*readme_main_command(), "--num-pairs", "4000", "--epochs", "1"]  # tiny, same command
    outputs = []
    for _ in range(2):
        done = subprocess.run(
            [sys.executable, "-m", "poeem", *args], cwd=tmp_path, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, done.stderr
        outputs.append(done.stdout + done.stderr)
    labels = ("exact (brute force)", "FAISS IVF8,PQ8 (after training)", "Poeem as trained (default)")
    for label in labels:
        assert label in outputs[0] and label in outputs[1]
        row = next(line for line in outputs[1].splitlines() if line.startswith(label))
        train_s, build_s, served_s = (float(v) for v in row[len(label) :].split()[2:5])
        assert served_s == pytest.approx(train_s + build_s, abs=0.11)  # each printed to 0.1 s
    assert "served after s" in outputs[1]
    assert "replacing the earlier demo run in runs/demo/baseline/" in outputs[1]
    assert "\r" not in outputs[1]  # no progress-bar redraws when the output is not a terminal
    assert sorted(p.name for p in (tmp_path / "runs" / "demo").iterdir()) == ["baseline", "poeem"]


def test_the_demo_never_deletes_what_it_did_not_write(tmp_path: Path) -> None:
    mine = tmp_path / "demo" / "poeem" / "notes.txt"
    mine.parent.mkdir(parents=True)
    mine.write_text("keep me")
    message = failure("demo", "--num-pairs", "4000", "--epochs", "1", "--out", tmp_path / "demo")
    assert "got other files there (notes.txt). Fix: pass another --out" in message
    assert mine.read_text() == "keep me"


# ------------------------------------------------------ every Fix names the command's options
def options_of(command: str) -> set[str]:
    group = typer.main.get_command(app)
    return {opt for param in group.commands[command].params for opt in param.opts + param.secondary_opts}


def test_every_fix_names_options_its_command_has(run_and_index: tuple[Path, Path], tmp_path: Path) -> None:
    run, ix = run_and_index
    missing = tmp_path / "missing.txt"
    busy = tmp_path / "taken"
    busy.mkdir()
    (busy / "poeem").mkdir()
    (busy / "poeem" / "x").write_text("")
    (tmp_path / "q.txt").write_text("1\n")
    errors = {
        "train": [
            failure("train", "--run-dir", run, "--max-steps", "1"),  # a trained run
            failure("train", "--run-dir", run, "--resume", "--lr", "0.5"),
            failure("train", "--run-dir", tmp_path / "new", "--resume"),
            failure("train", "--data", "movielens", "--run-dir", tmp_path / "r"),
            failure("train", "--data", "movielens", "--data-path", missing, "--run-dir", tmp_path / "r"),
            failure("train", "--k", "0", "--run-dir", tmp_path / "r"),
            failure("train", "--lr", "inf", "--run-dir", tmp_path / "r"),
            failure("train", "--seed", "-1", "--run-dir", tmp_path / "r"),
        ],
        "search": [
            failure("search", ix, "--query-file", missing),
            failure("search", ix),
            failure("search", ix / "nope", "--query-file", tmp_path / "q.txt"),
            failure("search", ix, "--query-file", tmp_path / "q.txt", "--exclude", missing),
        ],
        "export": [failure("export", run, "--out", ix), failure("export", tmp_path / "nope", "--out", ix)],
        "add": [failure("add", ix, "--items", missing, "--ids", missing)],
        "remove": [failure("remove", ix, "--ids", missing)],
        "serve": [failure("serve", ix, "--token-file", missing), failure("serve", ix, "--port", "70000")],
        "embed": [failure("embed", run, "--ids", missing, "--out", tmp_path / "e.npy")],
        "evaluate": [failure("evaluate", tmp_path / "nope"), failure("evaluate", run, "--nprobe", "0")],
        "demo": [failure("demo", "--num-pairs", "4000", "--out", busy)],
    }
    for command, messages in errors.items():
        for message in messages:
            named = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", message.split("Fix:")[-1]))
            assert named <= options_of(command), (command, message)
    assert "--data-path" not in " ".join(errors["search"] + errors["add"] + errors["serve"])


# ------------------------------------------------------------------------------- train
def test_train_says_what_it_does_without_progress_bars_and_a_finished_run_says_so(tmp_path: Path) -> None:
    """``poeem train`` with no flags names the built-in task; with output that is no terminal no
    bar is drawn; resuming a finished run says there is nothing to do."""
    args = ["train", "--run-dir", str(tmp_path / "r"), "--max-steps", "2", "--logger", "none"]
    done = subprocess.run(
        [sys.executable, "-m", "poeem", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TERM": "xterm"},
    )
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr and "train:" not in done.stderr
    assert "no --data given: training on the built-in synthetic task" in done.stdout
    assert "training a two-tower model on synthetic: 10000 queries" in done.stdout
    out = ok("train", "--run-dir", tmp_path / "r", "--resume")
    assert "already at step 2 of 2, nothing to train" in out


# ------------------------------------------------------------------------------ search
def test_unknown_query_ids_fail_before_any_output(run_and_index: tuple[Path, Path], tmp_path: Path) -> None:
    _, ix = run_and_index
    (tmp_path / "q.txt").write_text("1\n999999\n")
    result = cli("search", ix, "--query-file", tmp_path / "q.txt")
    assert isinstance(result.exception, PoeemError) and result.stdout == ""


def test_a_mistyped_folder_says_it_does_not_exist(tmp_path: Path) -> None:
    assert "got '" + str(tmp_path / "mll") + "', which does not exist" in failure(
        "evaluate", tmp_path / "mll"
    )
    message = failure("search", tmp_path / "mll", "--query-file", tmp_path / "q.txt")
    assert "index directory: expected an existing folder" in message and "which does not exist" in message


def test_short_rows_are_warned_with_an_nprobe_to_try(
    run_and_index: tuple[Path, Path], tmp_path: Path
) -> None:
    _, ix = run_and_index
    searcher = Searcher.load(ix)
    sizes = np.bincount(searcher.tensors.coarse_codes.numpy(), minlength=searcher.nlist)
    k = int(sizes.min()) + 1  # more than the smaller list holds
    (tmp_path / "q.txt").write_text("\n".join(str(q) for q in range(200)) + "\n")
    with pytest.warns(
        UserWarning, match=r"queries got fewer than \d+ results .*--nprobe \(now 1 of 2 lists\)"
    ):
        out = ok("search", ix, "--query-file", tmp_path / "q.txt", "-k", k)
    rows = out.strip().splitlines()[1:]
    assert len(rows) < 200 * k
    with pytest.warns(UserWarning, match="larger than the 10000 items"):
        ok(
            "search",
            ix,
            "--query-file",
            tmp_path / "q.txt",
            "-k",
            20000,
            "--nprobe",
            2,
            "--out",
            tmp_path / "o",
        )


def test_exclude_file_leaves_out_each_querys_items(run_and_index: tuple[Path, Path], tmp_path: Path) -> None:
    _, ix = run_and_index
    (tmp_path / "q.txt").write_text("3\n4\n")
    before = [
        line.split(",") for line in ok("search", ix, "--query-file", tmp_path / "q.txt", "-k", 6).split()[1:]
    ]
    top = {q: [item for qq, _, item, _ in before if qq == q] for q in ("3", "4")}
    (tmp_path / "seen.tsv").write_text(f"3\t{top['3'][0]}\t5\n3\t{top['3'][2]}\t4\n4 {top['4'][1]}\n")
    after = ok("search", ix, "--query-file", tmp_path / "q.txt", "-k", 4, "--exclude", tmp_path / "seen.tsv")
    got = {
        q: [line.split(",")[2] for line in after.split()[1:] if line.startswith(q + ",")] for q in ("3", "4")
    }
    assert got["3"] == [top["3"][1], *top["3"][3:6]]
    assert got["4"] == [top["4"][0], *top["4"][2:5]]


def test_searcher_exclude_equals_filtering_a_wider_search(run_and_index: tuple[Path, Path]) -> None:
    _, ix = run_and_index
    searcher = Searcher.load(ix)
    xq = searcher.embed_queries(np.arange(6))
    wide_scores, wide = searcher.search(xq, 40, 2)
    drop = [wide[0][:30].tolist(), [], wide[2][[0, 5]].tolist(), [10**9], wide[4][:1].tolist(), ["7"]]
    scores, got = searcher.search(xq, 5, 2, exclude=drop)
    for row in range(len(drop)):
        kept = ~np.isin(wide[row], np.array([int(x) for x in drop[row]], dtype=np.int64))
        # the default index is 4-bit fast scan, whose quantized scores tie often: ids are
        # compared as sets among equal scores
        assert_same_topk(
            scores[row : row + 1],
            got[row : row + 1],
            wide_scores[row][kept][None, :5],
            wide[row][kept][None, :5],
        )


# ------------------------------------------------------------------------ embed, add, export
def test_embed_feeds_add_and_finds_the_new_item(run_and_index: tuple[Path, Path], tmp_path: Path) -> None:
    run, _ = run_and_index
    (tmp_path / "ids.txt").write_text("5\n17\n")
    ok("embed", run, "--ids", tmp_path / "ids.txt", "--out", tmp_path / "two.npy")
    _, model = load_run(run)
    with torch.no_grad():
        expected = model.encode_items(torch.tensor([5, 17])).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "two.npy"), expected, rtol=1e-6)
    ok("embed", run, "--ids", tmp_path / "ids.txt", "--mean", "--out", tmp_path / "new.npy")
    np.testing.assert_allclose(np.load(tmp_path / "new.npy"), expected.mean(0, keepdims=True), rtol=1e-6)
    copy = tmp_path / "ix"
    ok("export", run, "--out", copy)
    (tmp_path / "new_id.txt").write_text("123456\n")
    assert "10001 items" in ok("add", copy, "--items", tmp_path / "new.npy", "--ids", tmp_path / "new_id.txt")
    _, ids = Searcher.load(copy).search(np.load(tmp_path / "new.npy"), 10, nprobe=2)
    assert 123456 in ids[0].tolist()  # among its own 10 nearest (codes are 4 x 4 bits here)
    assert "takes no features" in failure(
        "embed",
        run,
        "--ids",
        tmp_path / "ids.txt",
        "--out",
        tmp_path / "x.npy",
        "--item-features",
        tmp_path / "two.npy",
    )


def test_embed_uses_the_saved_item_features(tmp_path: Path) -> None:
    from poeem.pipeline.run_dir import read_artifacts

    train_run(table_config(write_table(tmp_path / "t.csv")), tmp_path / "run")
    art = read_artifacts(tmp_path / "run")
    sku = str(art.item_keys.keys[3])
    (tmp_path / "ids.txt").write_text(sku + "\n")
    ok("embed", tmp_path / "run", "--ids", tmp_path / "ids.txt", "--out", tmp_path / "e.npy")
    _, model = load_run(tmp_path / "run")
    row = torch.from_numpy(art.item_keys.rows([sku]))
    with torch.no_grad():
        expected = model.encode_items(row, art.item_features[row]).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "e.npy"), expected, rtol=1e-6)


def test_export_replace_publishes_a_new_version(run_and_index: tuple[Path, Path], tmp_path: Path) -> None:
    run, _ = run_and_index
    ix = tmp_path / "ix"
    ok("export", run, "--out", ix)
    (tmp_path / "ids.txt").write_text("3\n")
    ok("remove", ix, "--ids", tmp_path / "ids.txt")  # version 2, 9,999 items
    assert "holds an index" in failure("export", run, "--out", ix)
    out = ok("export", run, "--out", ix, "--replace")
    assert "exported 10000 items" in out and "(version 3)" in out
    searcher = Searcher.load(ix)
    assert searcher.version == 3 and searcher.ntotal == 10_000
    # version 2 (the base of version 1 plus tombstones) stays for readers that just read it
    assert {p.name for p in ix.glob("index-*.faiss")} == {"index-1.faiss", "index-3.faiss"}
    assert "tombstones" not in searcher.manifest.files


# --------------------------------------------------------------------------- health window
def test_code_usage_covers_a_window_not_the_last_short_batch() -> None:
    from poeem import PoeemLayer

    layer = PoeemLayer(
        dim=16, num_subspaces=4, codebook_size=256, num_coarse=4, warmup_steps=0, buffer_size=2048
    )
    layer.initialize(torch.randn(2048, 16))
    layer.train()
    for _ in range(8):
        layer(torch.randn(512, 16))
    layer(torch.randn(64, 16))
    # 64 rows alone cannot reach a perplexity above 64; the window of 4,096 rows does
    assert layer.stats()["subcode_perplexity"] > 100
    assert layer.stats()["subcodes_used"] > 200


def test_the_readme_python_quickstart_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"## Python quickstart\n.*?```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["ids"].shape == (2, 10) and scope["scores"].shape == (2, 10)
    assert np.isin(scope["ids"], np.arange(10_000)).all()  # the synthetic task's item ids
    assert (tmp_path / "index" / "quick" / "manifest.json").is_file()


def test_the_readme_command_line_block_runs_line_by_line(tmp_path: Path) -> None:
    """Every command of the README's MovieLens block, on a small generated u.data (the same ids
    the README uses), each input made by a line before it."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Command line\n.*?```bash\n(.*?)```", readme, re.S).group(1)
    data = tmp_path / "ml"
    data.mkdir()
    rng = np.random.default_rng(0)
    users, items = rng.integers(1, 61, 3000), rng.integers(1, 201, 3000)
    rows = {(int(u), int(i)) for u, i in zip(users, items, strict=True)} | {(1, 50), (42, 172), (42, 181)}
    (data / "u.data").write_text("".join(f"{u}\t{i}\t4\t{t}\n" for t, (u, i) in enumerate(sorted(rows))))
    script = block.replace("../shared/datasets/ml-100k", str(data)).replace("--epochs 20 ", "--epochs 2 ")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "removed 1 items" in done.stdout and "merged 1 segments and 1 removed ids" in done.stdout
    assert "(version 5)" in done.stdout
    assert (
        "4 bytes per item (8 x 4-bit PQ codes), fast scan" in done.stdout
    )  # the defaults' K, --num-subspaces 8
    hits = [line for line in done.stdout.splitlines() if line.startswith(("1,", "42,"))]
    assert hits and not any(line.startswith("1,") and line.split(",")[2] == "50" for line in hits)
