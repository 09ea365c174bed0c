"""How a training run is configured: optimisation and bookkeeping (:class:`TrainConfig`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from poeem.errors import PoeemError
from poeem.options import Count, NonNegative, Positive, PositiveInt, Seed, check_settings, setting

OptimizerName = Literal["adam", "adamw", "adagrad"]
TableOptimizerName = Literal["dense", "rowwise_adagrad", "sparse_adam"]
TableShardingName = Literal["none", "torchrec"]


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping of a training run."""

    epochs: Count = setting(3, help="Epochs.", resume=True)
    batch_size: PositiveInt = setting(1024, help="Training batch size (under torchrun: the global batch).")
    optimizer: OptimizerName = setting("adam", help="Optimizer of the model.")
    lr: Positive = setting(1e-2, help="Learning rate.")
    index_lr: NonNegative | None = setting(
        None, help="Learning rate of the index (codebooks, rotation); default --lr; 0 freezes it."
    )
    weight_decay: NonNegative = setting(0.0, help="Weight decay.")
    table_optimizer: TableOptimizerName = setting(
        "dense",
        help="Id tables: dense (the --optimizer) or a sparse optimizer that updates only the rows "
        "a batch used (rowwise_adagrad, sparse_adam).",
    )
    table_lr: Positive | None = setting(None, help="Learning rate of the id tables (default: --lr).")
    table_sharding: TableShardingName = setting(
        "none",
        help="Id tables: replicated on every process (none), or sharded row-wise over the torchrun "
        "processes by TorchRec, each holding and saving only its rows (torchrec; with "
        "--table-optimizer rowwise_adagrad, which it fuses into the backward pass).",
    )
    seed: Seed = setting(0, help="Seed of initialisation and batch order (not the data).")
    device: str = setting("auto", help="cpu, cuda, cuda:1 or auto.", resume=True)
    checkpoint_every: Count = setting(
        1000, help="Steps between checkpoints (0: only at the end).", resume=True
    )
    eval_every: Count = setting(
        0, help="Steps between evaluations (0: at the end of each epoch).", resume=True
    )
    log_every: PositiveInt = setting(50, help="Steps between rows of the training curves.", resume=True)
    log: Literal["csv", "tensorboard", "none"] = setting(
        "csv", help="Training curves.", flag="--logger", resume=True
    )
    max_steps: Count | None = setting(
        None, help="Stop after this many steps (a checkpoint is still written).", resume=True
    )
    distill_epochs: Count | None = setting(
        None,
        help="After training, distil the index from the model's own ranking for this many epochs "
        "per round (0: no; one process only); default 10 with --refit, else 0.",
        resume=True,
    )
    refit: Literal["auto", "pq", "rq", "none"] | None = setting(
        None,
        help="none (default): serve the index as trained, ready the moment training ends, in one "
        "process and under torchrun alike. Opt-in: after training, refit the layer's residual coder "
        "on the final item embeddings inside its trained lists, then distil it (a build after "
        "training, docs/cli.md): rq, a residual quantizer at the same bytes (no fast scan), or pq; "
        "auto: rq for a run with a layer in one process, else none.",
        resume=True,
    )
    progress: bool = setting(True, help="Progress bars.", resume=True)

    def __post_init__(self) -> None:
        check_settings(self, "train")
        if self.refit == "none":  # how a TOML file or the command line says None
            self.refit = None
        check_device_name(self.device)


def devices_here() -> list[str]:
    """The device names this machine can train on: "auto", "cpu" and each CUDA device."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return ["auto", "cpu", *(["cuda"] if count else []), *(f"cuda:{i}" for i in range(count))]


def check_device_name(name: str) -> None:
    """A clear error unless ``name`` names a device kind training runs on ("auto", "cpu",
    "cuda", "cuda:N"); whether this machine has it is checked when a run starts
    (:func:`poeem.training.trainer.resolve_device`), so a config written here runs elsewhere."""
    try:
        kind = "auto" if name == "auto" else torch.device(name).type
    except RuntimeError:
        kind = None
    if kind not in ("auto", "cpu", "cuda"):
        raise PoeemError(
            "train.device",
            "cpu, cuda, cuda:N or auto",
            repr(name),
            f"pass one of the devices of this machine: {', '.join(devices_here())}",
        )
