"""Training: deterministic batches, a model-agnostic trainer, atomic checkpoints."""

from poeem.training.batches import PairBatches
from poeem.training.checkpoint import load_checkpoint, save_checkpoint
from poeem.training.trainer import TrainConfig, Trainer, build_optimizer, resolve_device

__all__ = [
    "PairBatches",
    "TrainConfig",
    "Trainer",
    "build_optimizer",
    "load_checkpoint",
    "resolve_device",
    "save_checkpoint",
]
