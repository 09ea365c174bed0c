"""How a training run is configured: optimisation and bookkeeping (:class:`TrainConfig`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from poeem.errors import PoeemError
from poeem.options import setting

OptimizerName = Literal["adam", "adamw", "adagrad"]
TableOptimizerName = Literal["dense", "rowwise_adagrad", "sparse_adam"]
TableShardingName = Literal["none", "torchrec"]


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping of a training run."""

    epochs: int = setting(3, help="Epochs.", resume=True)
    batch_size: int = setting(1024, help="Training batch size (under torchrun: the global batch).")
    optimizer: OptimizerName = setting("adam", help="Optimizer of the model.")
    lr: float = setting(1e-2, help="Learning rate.")
    index_lr: float | None = setting(
        None, help="Learning rate of the index (codebooks, rotation); default --lr; 0 freezes it."
    )
    weight_decay: float = setting(0.0, help="Weight decay.")
    table_optimizer: TableOptimizerName = setting(
        "dense",
        help="Id tables: dense (the --optimizer) or a sparse optimizer that updates only the rows "
        "a batch used (rowwise_adagrad, sparse_adam).",
    )
    table_lr: float | None = setting(None, help="Learning rate of the id tables (default: --lr).")
    table_sharding: TableShardingName = setting(
        "none",
        help="Id tables: replicated on every process (none), or sharded row-wise over the torchrun "
        "processes by TorchRec, each holding and saving only its rows (torchrec; with "
        "--table-optimizer rowwise_adagrad, which it fuses into the backward pass).",
    )
    seed: int = setting(0, help="Seed of initialisation and batch order (not the data).")
    device: str = setting("auto", help="cpu, cuda, cuda:1 or auto.", resume=True)
    checkpoint_every: int = setting(1000, help="Steps between checkpoints (0: only at the end).", resume=True)
    eval_every: int = setting(0, help="Steps between evaluations (0: at the end of each epoch).", resume=True)
    log_every: int = setting(50, help="Steps between rows of the training curves.", resume=True)
    log: Literal["csv", "tensorboard", "none"] = setting(
        "csv", help="Training curves.", flag="--logger", resume=True
    )
    max_steps: int | None = setting(
        None, help="Stop after this many steps (a checkpoint is still written).", resume=True
    )
    distill_epochs: int | None = setting(
        None,
        help="After training, distil the index from the model's own ranking for this many epochs "
        "per round (0: no; one process only); default 10 with --refit, else 0.",
        resume=True,
    )
    refit: Literal["auto", "pq", "rq"] | None = setting(
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
        if self.refit == "none":  # how a TOML file or the command line says None
            self.refit = None
        checks = [
            ("epochs", self.epochs >= 0, "a non-negative integer"),
            ("batch_size", self.batch_size >= 1, "a positive integer"),
            ("lr", self.lr > 0, "a positive number"),
            ("index_lr", self.index_lr is None or self.index_lr >= 0, "None or a number >= 0"),
            ("weight_decay", self.weight_decay >= 0, "a number >= 0"),
            ("table_lr", self.table_lr is None or self.table_lr > 0, "None or a positive number"),
            (
                "table_optimizer",
                self.table_optimizer in get_args(TableOptimizerName),
                _one_of(get_args(TableOptimizerName)),
            ),
            (
                "table_sharding",
                self.table_sharding in get_args(TableShardingName),
                _one_of(get_args(TableShardingName)),
            ),
            ("checkpoint_every", self.checkpoint_every >= 0, "an integer >= 0"),
            ("eval_every", self.eval_every >= 0, "an integer >= 0"),
            ("log_every", self.log_every >= 1, "a positive integer"),
            ("max_steps", self.max_steps is None or self.max_steps >= 0, "None or an integer >= 0"),
            ("distill_epochs", (self.distill_epochs or 0) >= 0, "None or an integer >= 0"),
            ("refit", self.refit in (None, "auto", "pq", "rq"), "'auto', 'rq', 'pq' or 'none'"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise PoeemError(
                    f"train.{name}", expected, repr(getattr(self, name)), f"fix --{name.replace('_', '-')}"
                )


def _one_of(names: tuple[str, ...]) -> str:
    """'a', 'b' or 'c'."""
    quoted = [repr(name) for name in names]
    return f"{', '.join(quoted[:-1])} or {quoted[-1]}"
