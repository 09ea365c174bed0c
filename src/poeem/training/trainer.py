"""A trainer that knows nothing about the model: the model maps a batch to a dict of scalars
holding ``loss``; evaluation and logging join through callbacks.

Under torch.distributed (see :mod:`poeem.distributed`) the model is wrapped in
DistributedDataParallel; progress, logs, evaluation and checkpoints happen on rank 0 only."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, get_args

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from poeem import distributed
from poeem.errors import PoeemError
from poeem.training.checkpoint import load_checkpoint, save_checkpoint
from poeem.training.metrics_log import MetricsLog
from poeem.training.optimizers import OptimizerName, TableOptimizerName, build_optimizer


class BatchSource(Protocol):
    """Deterministic batches: ``batch(epoch, index)`` for ``index < len(source)``."""

    def __len__(self) -> int: ...

    def batch(self, epoch: int, index: int) -> dict[str, torch.Tensor]: ...


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


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when available; an unavailable CUDA device is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PoeemError(
            "device", "an available device", f"'{name}' (no CUDA here)", "pass --device cpu or --device auto"
        )
    return device


class Trainer:
    """Runs epochs of ``model(batch)["loss"]`` with checkpoints, evaluation and logs.

    Args:
        model: maps a batch dict to a dict of scalar tensors that includes ``loss``; under
            torch.distributed it is wrapped in DistributedDataParallel (gradients averaged over
            ranks; the Poeem layer keeps its own state identical on every rank).
        cfg: the :class:`TrainConfig`.
        run_dir: folder for ``checkpoint.safetensors`` and ``log.csv``; None keeps nothing.
            Every rank reads the checkpoint on resume, so it must be on a shared file system.
        evaluate: called with the model at each evaluation, on rank 0; returns named metrics.
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: TrainConfig,
        run_dir: Path | None = None,
        evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    ) -> None:
        self.model, self.cfg, self.run_dir, self.evaluate = model, cfg, run_dir, evaluate
        self.main = distributed.is_main()
        self.optimizer = build_optimizer(model, cfg)
        self.step = 0
        self.eval_s = 0.0  # seconds spent in evaluation callbacks during fit()
        self.history: list[dict[str, float]] = []  # evaluation results, with "step"
        self.log = MetricsLog(run_dir, cfg.log) if run_dir is not None and self.main else None

    @property
    def checkpoint_path(self) -> Path | None:
        """Where checkpoints go."""
        return self.run_dir / "checkpoint.safetensors" if self.run_dir else None

    def resume(self) -> None:
        """Restore model, optimizer, step and history from the run folder's checkpoint."""
        assert self.checkpoint_path is not None, "resume needs a run_dir"
        state = load_checkpoint(self.checkpoint_path, self.model, self.optimizer)
        self.step, self.history = int(state["step"]), list(state.get("history", []))

    def save(self) -> None:
        """Write a checkpoint atomically, on rank 0 (no-op without a run folder)."""
        if self.checkpoint_path is not None and self.main:
            save_checkpoint(
                self.checkpoint_path, self.model, self.optimizer, {"step": self.step, "history": self.history}
            )

    def total_steps(self, per_epoch: int) -> int:
        """Where training stops: ``epochs`` epochs of ``per_epoch`` steps, or ``max_steps``."""
        every = self.cfg.epochs * per_epoch
        return every if self.cfg.max_steps is None else min(self.cfg.max_steps, every)

    def fit(self, batches: BatchSource) -> list[dict[str, float]]:
        """Train from the current step to ``cfg.epochs`` epochs (or ``cfg.max_steps``).

        Returns:
            The evaluation history.
        """
        cfg, per_epoch = self.cfg, len(batches)
        total = self.total_steps(per_epoch)
        if self.step >= total:
            if self.main:
                tqdm.write(
                    f"already at step {self.step} of {total}, nothing to train "
                    "(raise --epochs or --max-steps to continue)"
                )
            return self.history
        eval_every = cfg.eval_every or per_epoch
        bar = tqdm(
            total=total,
            initial=self.step,
            disable=None if cfg.progress and self.main else True,  # None: off when not a terminal
            desc="train",
            dynamic_ncols=True,
            leave=False,
            mininterval=1.0,
        )
        net = self._distributed_model()
        self.model.train()
        started, started_step, eval_before = time.perf_counter(), self.step, self.eval_s
        try:
            while self.step < total:
                epoch, index = divmod(self.step, per_epoch)
                out = net(batches.batch(epoch, index))
                loss = out["loss"]
                shown = distributed.mean_across_ranks(loss.detach())  # every rank stops together
                if not torch.isfinite(shown):
                    raise PoeemError(
                        "training loss",
                        "a finite value",
                        f"{float(shown)} at step {self.step}",
                        "lower the learning rate or the temperature",
                    )
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                self.step += 1
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == total:
                    busy = time.perf_counter() - started - (self.eval_s - eval_before)
                    rate = (self.step - started_step) / max(busy, 1e-9)
                    row = {k: float(v.detach()) for k, v in out.items()} | {
                        "loss": float(shown),
                        "steps_per_s": rate,
                        "epoch": epoch,
                    }
                    bar.set_postfix({k: f"{v:.3g}" for k, v in row.items() if k in _SHOWN})
                    if self.log:
                        self.log.write(self.step, row)
                if self.evaluate and self.main and (self.step % eval_every == 0 or self.step == total):
                    self._evaluate()
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save()
        finally:
            bar.close()
            if self.log:
                self.log.close()
        self.save()
        return self.history

    def _distributed_model(self) -> nn.Module:
        """The model, wrapped in DistributedDataParallel under torch.distributed."""
        if not distributed.is_active():
            return self.model
        device = next(self.model.parameters()).device
        index = getattr(self.model, "index", None)
        return DistributedDataParallel(
            self.model,
            device_ids=[device] if device.type == "cuda" else None,
            # an index still in its warm start gets no gradient until k-means has run
            find_unused_parameters=index is not None and not getattr(index, "is_initialized", True),
            forward_sync_buffers=False,  # the layer keeps its state identical on every rank itself
        )

    def _evaluate(self) -> None:
        assert self.evaluate is not None
        started = time.perf_counter()
        self.model.eval()
        metrics = self.evaluate(self.model)
        self.model.train()
        self.eval_s += time.perf_counter() - started
        self.history.append({"step": self.step, **metrics})
        if self.log:
            self.log.write(self.step, {f"eval/{k}": v for k, v in metrics.items()})
        tqdm.write(f"step {self.step}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))


_SHOWN = {"loss", "task_loss", "steps_per_s", "relative_distortion", "subcode_perplexity", "coarse_used"}
