"""Training: deterministic batches, a model-agnostic trainer, atomic checkpoints."""

from poeem.training.batches import PairBatches
from poeem.training.checkpoint import load_checkpoint, save_checkpoint
from poeem.training.config import TrainConfig
from poeem.training.optimizers import RowWiseAdagrad, build_optimizer
from poeem.training.trainer import Trainer, resolve_device

__all__ = [
    "PairBatches",
    "RowWiseAdagrad",
    "TrainConfig",
    "Trainer",
    "build_optimizer",
    "load_checkpoint",
    "resolve_device",
    "save_checkpoint",
]
