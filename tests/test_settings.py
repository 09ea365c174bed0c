"""Settings are declared once, in the config classes: the command line, the resume check and
the docs' tables come from them."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from poeem.cli import app
from poeem.cli_options import distill_options, given_settings
from poeem.pipeline.config import run_options
from poeem.settings_tables import DOCUMENTED, refreshed_tables

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
