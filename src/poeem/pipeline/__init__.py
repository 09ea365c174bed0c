"""Whole runs: a run's config and folder, training with evaluation, and export."""

from poeem.pipeline.config import EvalConfig, RunConfig
from poeem.pipeline.run import attach_data, evaluate_model, export_run, resume_config, train_run
from poeem.pipeline.run_dir import load_run

__all__ = [
    "EvalConfig",
    "RunConfig",
    "attach_data",
    "evaluate_model",
    "export_run",
    "load_run",
    "resume_config",
    "train_run",
]
