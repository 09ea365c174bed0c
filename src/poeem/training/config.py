"""How a training run is configured: optimisation and bookkeeping (:class:`TrainConfig`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from poeem.errors import PoeemError

OptimizerName = Literal["adam", "adamw", "adagrad"]
TableOptimizerName = Literal["dense", "rowwise_adagrad", "sparse_adam"]


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping of a training run."""

    epochs: int = 3
    batch_size: int = 1024
    optimizer: OptimizerName = "adam"
    lr: float = 1e-2
    index_lr: float | None = None  # learning rate of the index (codebooks, rotation); None = lr, 0 freezes
    weight_decay: float = 0.0
    # id tables: "dense" (the optimizer above) or a sparse optimizer that updates only the rows
    # a batch touched ("rowwise_adagrad", "sparse_adam"), see poeem.training.optimizers
    table_optimizer: TableOptimizerName = "dense"
    table_lr: float | None = None  # learning rate of the id tables; None = lr
    seed: int = 0
    device: str = "auto"  # "cpu", "cuda", "cuda:1" or "auto"
    checkpoint_every: int = 1000  # steps between checkpoints (0: only at the end)
    eval_every: int = 0  # steps between evaluations (0: at the end of each epoch)
    log_every: int = 50  # steps between log rows
    log: Literal["csv", "tensorboard", "none"] = "csv"
    max_steps: int | None = None  # stop early (a checkpoint is still written)
    # epochs per round of index distillation after training (poeem.training.distill; 0: none):
    # the frozen model's own ranking of its training queries teaches the layer. None: 10 for
    # text models with a layer trained in one process (pipeline.run.distill_epochs), else 0
    distill_epochs: int | None = None
    # None or "none" (the default): the run serves its index as trained, ready when training
    # ends. Opt-in: after training, refit the layer's residual coder on the final item embeddings
    # inside its trained lists (poeem.index.refit), "rq" (a residual quantizer, same bytes) or
    # "pq"; the refitted index is then distilled (distill_epochs None: 10) and is the one the
    # run serves, at the cost of a build after training (docs/benchmarks.md). "auto": "rq" for
    # a run with a layer in one process, else none
    refit: Literal["auto", "pq", "rq"] | None = None
    progress: bool = True

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
