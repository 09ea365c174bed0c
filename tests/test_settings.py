"""Settings are declared once, in the config classes: the command line, the resume check and
the docs' tables come from them."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from poeem import PoeemError, PoeemLayer
from poeem.cli import app
from poeem.cli_options import distill_options, given_settings
from poeem.data import DataConfig
from poeem.model import ModelConfig
from poeem.pipeline.config import EvalConfig, RunConfig, run_options
from poeem.settings_tables import DOCUMENTED, refreshed_tables
from poeem.training import TrainConfig
from poeem.training.distill import DistillConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", DOCUMENTED)
def test_the_docs_settings_tables_are_current(name: str) -> None:
    text = (ROOT / name).read_text()
    assert "<!-- settings: " in text
    assert refreshed_tables(text, run_options()) == text, "run python -m poeem.settings_tables"


def test_every_flag_of_train_sets_its_config_field() -> None:
    found = [o for o in run_options() if o.cli]
    flags = [o.flag for o in found]
    assert len(flags) == len(set(flags)) and len({o.param for o in found}) == len(found)
    help_text = CliRunner().invoke(app, ["train", "--help"], terminal_width=200).output
    assert all(flag in help_text for flag in flags)
    values = {"lr": 0.5, "k": [5, 10], "data_seed": 3, "text_mode": "query", "num_coarse": 4}
    given = given_settings(values, run_options())
    assert given == {
        "train": {"lr": 0.5},
        "eval": {"ks": (5, 10)},
        "data": {"seed": 3},
        "model.text": {"mode": "query"},
        "model.poeem": {"num_coarse": 4},
    }


def test_a_flag_sets_only_its_own_setting() -> None:
    """Regression: --seed also set the layer's seed (a setting without a flag), which turned the
    layer on in a run without --poeem."""
    assert given_settings({"seed": 5}, run_options()) == {"train": {"seed": 5}}


def test_only_settings_that_keep_the_model_and_batches_may_change_on_resume() -> None:
    safe = {o.name for o in run_options() if o.resume}
    assert {"epochs", "max_steps", "device", "refit", "distill_epochs", "log"} <= safe
    assert not safe & {"lr", "batch_size", "seed", "optimizer", "num_coarse", "dim"}
    assert all(o.section in ("train", "eval") for o in run_options() if o.resume)


def test_distill_takes_the_distillation_and_layer_shape_settings() -> None:
    given = given_settings(
        {"patience": 0, "max_queries": 0, "num_subspaces": 8, "epochs": 2}, distill_options()
    )
    assert given == {"distill": {"patience": 0, "max_queries": 0, "epochs": 2}, "layer": {"num_subspaces": 8}}
    from poeem.training.distill import DistillConfig

    config = DistillConfig(**given["distill"])
    assert config.patience is None and config.max_queries is None and config.epochs == 2  # 0: no limit


# ------------------------------------------- every setting is checked before any data loads
def cli_error(args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> str:
    """The one ``error:`` line ``poeem ARGS`` ends with (exit code 2, no traceback), run in this
    process through the entry point users run."""
    import warnings

    from poeem.cli import main

    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # main() sets its own
    monkeypatch.setattr(sys, "argv", ["poeem", *args])
    with pytest.raises(SystemExit) as done:
        main()
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert done.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def train_error(
    args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> str:
    """The error line of ``poeem train --run-dir RUN ARGS``, which ran no step."""
    line = cli_error(["train", "--run-dir", str(tmp_path / "run"), *args], monkeypatch, capsys)
    assert not (tmp_path / "run" / "checkpoint.safetensors").exists()
    return line


CONFIG_CASES = [
    # (config file name, its text, what the error line says)
    (
        "c.toml",
        '[model]\ndim = "64"',
        "model.dim: expected an integer >= 1, got '64' (a string). Fix: write it as a number: dim = 64",
    ),
    (
        "c.toml",
        '[train]\nepochs = "1"',
        "train.epochs: expected an integer >= 0, got '1' (a string). Fix: write it as a number: epochs = 1",
    ),
    (
        "c.json",
        '{"train": {"epochs": null}}',
        "train.epochs: expected an integer >= 0, got None (null). "
        "Fix: give train.epochs (--epochs) a value (leaving it out keeps the default 3)",
    ),
    (
        "c.toml",
        "[eval]\nks = 20",
        "eval.ks: expected a list of integers >= 1, got 20. Fix: write a list: ks = [20]",
    ),
    ("c.toml", '[eval]\nks = [20, "a"]', "eval.ks: expected a list of integers >= 1, got [20, 'a']"),
    (
        "c.json",
        '{"model": 5}',
        "[model]: expected a table of settings, got 5. Fix: write its settings under [model] in TOML",
    ),
    (
        "c.json",
        '{"model": {"poeem": "x"}}',
        "model.poeem: expected a table of settings (a dict) or None, got 'x' (a string). "
        "Fix: write them as a [model.poeem] table",
    ),
    (
        "c.toml",
        "[model.poeem]\nnum_subspace = 8",
        "[model.poeem]: expected settings among dim, num_subspaces, ",
    ),
    (
        "c.toml",
        '[train]\ndevice = "tpu:7"',
        "train.device: expected cpu, cuda, cuda:N or auto, got 'tpu:7'. "
        "Fix: pass one of the devices of this machine: auto, cpu",
    ),
    (
        "c.json",
        f'{{"train": {{"seed": {2**70}}}}}',
        "train.seed: expected an integer from 0 to 2147483647, got 1180591620717411303424",
    ),
    ("c.toml", "[eval]\nks = [0]", "eval.ks: expected a list of integers >= 1, got [0]"),
    (
        "c.toml",
        "[eval]\nnprobes = [0]",
        "eval.nprobes: expected a list of integers >= 1, got [0]. Fix: set eval.nprobes (--nprobe)",
    ),
    ("c.toml", "[train]\nlr = inf", "train.lr: expected a finite number > 0, got inf"),
    (
        "c.toml",
        "[train]\nbatch_size = true",
        "train.batch_size: expected an integer >= 1, got True (a boolean)",
    ),
    ("c.toml", "[data]\nnum_pairs = 0", "data.num_pairs: expected an integer >= 1, got 0"),
    (
        "c.toml",
        '[model]\nquery_hidden = "abc"',
        "model.query_hidden: expected a list of integers >= 1, got 'abc' (a string)",
    ),
    (
        "c.toml",
        "[model]\ndim = 32.5\n[model.poeem]\nnum_subspaces = 4",
        "model.dim: expected an integer >= 1, got 32.5. Fix: set model.dim (--dim) to an integer >= 1",
    ),
    ("c.toml", "[eval]\nks = []", "eval.ks: expected at least one value, got an empty list"),
]


@pytest.mark.parametrize(("name", "text", "message"), CONFIG_CASES)
def test_a_bad_config_file_is_one_line_before_any_data_loads(
    name: str,
    text: str,
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    import poeem.pipeline.run as run_module

    def never(*args: object) -> None:
        raise AssertionError("the data loaded")

    monkeypatch.setattr(run_module, "load_data", never)
    (tmp_path / name).write_text(text + "\n")
    line = train_error(["--config", str(tmp_path / name)], tmp_path, monkeypatch, capsys)
    assert message in line, line
    if "num_subspace " in text:
        assert line.endswith("Fix: did you mean 'num_subspaces'?")
    if "32.5" in text:
        assert "divisor" not in line


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--device", "tpu:7"], "train.device: expected cpu, cuda, cuda:N or auto, got 'tpu:7'"),
        (["--seed", str(2**40)], "train.seed: expected an integer from 0 to 2147483647"),
        (["--k", "0"], "eval.ks: expected a list of integers >= 1, got [0]"),
        (["--lr", "inf"], "train.lr: expected a finite number > 0, got inf"),
    ],
)
def test_a_bad_flag_is_one_line_before_any_data_loads(
    flags: list[str],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    import poeem.pipeline.run as run_module

    monkeypatch.setattr(run_module, "load_data", None)  # calling it would fail
    assert message in train_error(["--data", "synthetic", *flags], tmp_path, monkeypatch, capsys)


def test_a_new_run_told_its_layer_remembers_another_catalogue_size_is_told_to_leave_it_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "c.toml").write_text("[data]\nnum_pairs = 2000\n[model.poeem]\nnum_items = 5\n")
    line = train_error(["--config", str(tmp_path / "c.toml")], tmp_path, monkeypatch, capsys)
    assert "model.poeem.num_items: expected 0 (no trained codes) or the catalogue size" in line
    assert "got 5. Fix: leave it out: the model sets it" in line and "pass the folder" not in line


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: TrainConfig(batch_size=True), "train.batch_size: expected an integer >= 1, got True"),
        (lambda: TrainConfig(lr=float("inf")), "train.lr: expected a finite number > 0, got inf"),
        (lambda: TrainConfig(seed=2**70), "train.seed: expected an integer from 0 to 2147483647"),
        (lambda: TrainConfig(device="tpu:7"), "train.device: expected cpu, cuda, cuda:N or auto"),
        (lambda: EvalConfig(ks=(0,)), r"eval.ks: expected a list of integers >= 1, got \[0\]"),
        (lambda: EvalConfig(nprobes=[0]), r"eval.nprobes: expected a list of integers >= 1, got \[0\]"),
        (lambda: DataConfig(num_pairs=0), "data.num_pairs: expected an integer >= 1, got 0"),
        (lambda: DataConfig(test_fraction=1.0), "data.test_fraction: expected a finite number > 0 and < 1"),
        (lambda: ModelConfig(query_hidden="abc"), "model.query_hidden: expected a list of integers >= 1"),
        (lambda: ModelConfig(poeem={"dim": 8}), r"model.poeem.dim: expected the model's dim \(64\), got 8"),
        (lambda: ModelConfig(text={"mode": "all"}), "model.text.mode: expected 'frozen', 'query' or 'both'"),
        (lambda: ModelConfig(text={"encoders": "x"}), "did you mean 'encoder'"),
        (lambda: PoeemLayer(dim=16, num_subspace=4), "did you mean 'num_subspaces'"),
        (lambda: PoeemLayer(dim=16, rotation="givnes"), "did you mean 'givens'"),
        (lambda: DistillConfig(holdout=1.0), "distill.holdout: expected a finite number >= 0 and < 1"),
        (lambda: RunConfig(model=ModelConfig(), train=5), "train: expected a TrainConfig, got 5"),
        (lambda: RunConfig(eval=EvalConfig(num_subspaces=5)), r"eval.num_subspaces \(the FAISS baseline's\)"),
    ],
)
def test_the_python_api_checks_settings_alike(build: Callable[[], object], message: str) -> None:
    with pytest.raises(PoeemError, match=message):
        build()


def test_config_files_keep_their_lists_and_numbers() -> None:
    cfg = RunConfig.from_dict(
        {"eval": {"ks": [5, 10]}, "train": {"lr": 1, "seed": np.int64(3)}, "model": {"query_hidden": [8]}}
    )
    assert cfg.eval.ks == (5, 10) and cfg.model.query_hidden == (8,)
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == 1.0 and type(cfg.train.seed) is int
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


def test_a_device_this_machine_lacks_names_those_it_has() -> None:
    from poeem.training import resolve_device

    if torch.cuda.device_count() >= 8:
        pytest.skip("this machine has a cuda:7")
    with pytest.raises(
        PoeemError, match=r"device: expected a device of this machine: auto, cpu.*got 'cuda:7'"
    ):
        resolve_device("cuda:7")


def test_evaluate_checks_its_nprobe_before_the_run_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    line = cli_error(["evaluate", str(tmp_path / "no-run"), "--nprobe", "0"], monkeypatch, capsys)
    assert "eval.nprobes: expected a list of integers >= 1, got [0]" in line


@pytest.mark.parametrize(
    ("stored", "message"),
    [
        ({"train": 5}, r"\[train\]: expected a table of settings, got 5"),
        ({"train": {"epochs": "3"}}, "train.epochs: expected an integer >= 0, got '3'"),
        ([1, 2], "run config: expected a JSON object, got list"),
    ],
)
def test_a_damaged_run_config_is_a_clear_error(tmp_path: Path, stored: object, message: str) -> None:
    import json

    from poeem.pipeline.run_dir import read_config

    (tmp_path / "config.json").write_text(json.dumps(stored))
    with pytest.raises(PoeemError, match=message):
        read_config(tmp_path)
