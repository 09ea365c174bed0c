"""Whole runs: a run's config and folder, training with evaluation, the recipe that builds its
index, and export."""

from poeem.pipeline.config import EvalConfig, RunConfig
from poeem.pipeline.recipe import IndexRecipe, build_index
from poeem.pipeline.run import attach_data, evaluate_model, export_run, resume_config, train_run
from poeem.pipeline.run_dir import load_run

__all__ = [
    "EvalConfig",
    "IndexRecipe",
    "RunConfig",
    "attach_data",
    "build_index",
    "evaluate_model",
    "export_run",
    "load_run",
    "resume_config",
    "train_run",
]
