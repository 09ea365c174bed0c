"""A trainer that knows nothing about the model: the model maps a batch to a dict of scalars
holding ``loss`` (and may have ``log_stats()``, scalars worth computing only for the steps that
are logged); evaluation and logging join through callbacks.

Under torch.distributed (see :mod:`poeem.distributed`) the model is wrapped in
DistributedDataParallel; progress, logs, evaluation and checkpoints happen on rank 0 only."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from poeem import distributed
from poeem.errors import PoeemError
from poeem.storage import inside
from poeem.training.checkpoint import read_checkpoint, restore_checkpoint, save_checkpoint
from poeem.training.config import TrainConfig, check_device_name, devices_here
from poeem.training.metrics_log import MetricsLog
from poeem.training.optimizers import build_optimizer
from poeem.training.table_sharding import (
    FIX,
    load_tables,
    save_with_tables,
    sharded_tables,
    without_sharded_tables,
)


class BatchSource(Protocol):
    """Deterministic batches: ``batch(epoch, index)`` for ``index < len(source)``."""

    def __len__(self) -> int: ...

    def batch(self, epoch: int, index: int) -> dict[str, torch.Tensor]: ...


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when available; a device this machine lacks is a clear error."""
    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in devices_here():
        raise PoeemError(
            "device",
            f"a device of this machine: {', '.join(devices_here())}",
            f"'{name}'",
            "pass --device auto, or one of those",
        )
    return torch.device(name)


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
        self.sharded = bool(sharded_tables(model))  # id tables sharded over the ranks
        self.optimizer = build_optimizer(model, cfg)
        self.step = 0
        self.eval_s = 0.0  # seconds spent in evaluation callbacks during fit()
        self.history: list[dict[str, float]] = []  # evaluation results, with "step"
        self.log = MetricsLog(run_dir, cfg.log) if run_dir is not None and self.main else None

    @property
    def checkpoint_path(self) -> Path | None:
        """Where checkpoints go."""
        return self.run_dir / "checkpoint.safetensors" if self.run_dir else None

    @property
    def tables_dir(self) -> Path | None:
        """Where each rank writes its rows of sharded tables at a checkpoint."""
        return self.run_dir / "checkpoint_tables" if self.run_dir else None

    def resume(self) -> None:
        """Restore model, optimizer, step and history from the run folder's checkpoint (and each
        rank's rows of sharded tables, saved by any number of ranks)."""
        assert self.checkpoint_path is not None and self.tables_dir is not None, "resume needs a run_dir"
        tensors, meta = read_checkpoint(self.checkpoint_path)
        if self.sharded != ("tables" in meta.get("trainer", {})):
            raise PoeemError(
                "--resume",
                "the table sharding the checkpoint was saved with",
                "sharded tables and a checkpoint of whole ones" if self.sharded else "the reverse",
                "resume with the run's own --table-sharding",
            )
        with without_sharded_tables(self.model):
            earlier = functools.partial(build_optimizer, self.model, self.cfg, scaled_groups=False)
            path, model, optimizer = self.checkpoint_path, self.model, self.optimizer
            state = restore_checkpoint(path, tensors, meta, model, optimizer, earlier=earlier)
        if self.sharded:
            tables = inside(self.tables_dir.parent, self.tables_dir.name, "checkpoint tables", FIX)
            load_tables(self.model, tables, state["tables"])
        self.step, self.history = int(state["step"]), list(state.get("history", []))

    def save(self) -> None:
        """Write a checkpoint atomically (no-op without a run folder): rank 0 writes the model and
        optimizer; with sharded tables every rank first writes its rows, which the checkpoint
        then names."""
        if self.checkpoint_path is None or self.tables_dir is None:
            return
        path, state = self.checkpoint_path, {"step": self.step, "history": self.history}

        def write(tables: str | None = None) -> None:
            extra = {"tables": tables} if tables is not None else {}
            save_checkpoint(path, self.model, self.optimizer, {**state, **extra})

        if self.sharded:
            save_with_tables(self.model, self.tables_dir, self.step, write)
            return
        if self.main:
            write()
        distributed.barrier()

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
                    logged = getattr(self.model, "log_stats", None)  # computed for logged steps only
                    row = (
                        {k: float(v.detach()) for k, v in out.items()}
                        | (logged() if logged else {})
                        | {
                            "loss": float(shown),
                            "steps_per_s": rate,
                            "epoch": epoch,
                        }
                    )
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
        tables = sharded_tables(self.model)
        if tables:  # they exchange rows and step themselves: DDP trains the rest
            owned = {id(p) for table in tables.values() for p in table.parameters()}
            ignored = [name for name, p in self.model.named_parameters() if id(p) in owned]
            # DDP's own way to leave parameters out (a private API, as TorchRec uses it; torch 2.13)
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self.model, ignored)
            if not any(p.requires_grad and id(p) not in owned for p in self.model.parameters()):
                return self.model
        device = next(self.model.parameters()).device
        index = getattr(self.model, "index", None)
        # an index still in its warm start gets no gradient until k-means has run, and lists
        # kept where it put them (list_lr_scale 0) never get one
        idle = index is not None and (
            not getattr(index, "is_initialized", True) or getattr(index.config, "list_lr_share", 1) == 0
        )
        return DistributedDataParallel(
            self.model,
            device_ids=[device] if device.type == "cuda" else None,
            find_unused_parameters=idle,
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
