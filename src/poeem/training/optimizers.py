"""Optimizers of a training run: one dense optimizer for the towers and the index, and, for
large id tables, a sparse one that touches only the rows a batch used.

With dense gradients, Adam reads and writes every row of every id table (and its two moment
buffers) on each step, so the step time grows with the catalogue. With ``table_optimizer``
set, the id tables emit sparse gradients (``nn.Embedding(sparse=True)``) and get their own
optimizer:

- ``rowwise_adagrad``: Adagrad with one accumulator per row (the mean of the row's squared
  gradient), as TorchRec/FBGEMM's row-wise Adagrad: 4 bytes of state per row;
- ``sparse_adam``: ``torch.optim.SparseAdam`` (lazy Adam: only the touched rows' moments move;
  two dense moment buffers of the table's size).
"""

from __future__ import annotations

from typing import Any, TypeAlias

import torch
from torch import nn

from poeem.errors import PoeemError
from poeem.model.sharded_tables import ShardedIdTable
from poeem.training.config import TrainConfig


class RowWiseAdagrad(torch.optim.Optimizer):
    """Adagrad with one accumulator per table row, for sparse (or dense) gradients of 2-D tables.

    For each touched row r with gradient g_r (dim,): ``sum_r += mean(g_r**2)``;
    ``w_r -= lr * g_r / (sqrt(sum_r) + eps)``. ``weight_decay`` adds ``weight_decay * w_r`` to
    the gradient of touched rows only (rows a batch used; with a dense gradient, rows with a
    non-zero entry). State: ``sum`` (rows,) float32 and ``step``.

    A bfloat16 table is updated in float32 and rounded back stochastically (up or down with
    the probability that keeps the expected row exact), as FBGEMM does for low-precision
    tables: rounding to nearest would drop every update smaller than half a bfloat16 step. The
    rounding noise is drawn from the step number and the table's position, so every rank of a
    DDP run rounds alike and a resumed run rounds as the uninterrupted one.
    """

    def __init__(self, params: Any, lr: float = 1e-2, eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        if lr <= 0 or eps <= 0 or weight_decay < 0:
            raise ValueError(f"invalid lr={lr}, eps={eps} or weight_decay={weight_decay}")
        super().__init__(params, {"lr": lr, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One update of every table that has a gradient; returns ``closure()`` if given."""
        loss = closure() if closure is not None else None
        tables = [(weight, group) for group in self.param_groups for weight in group["params"]]
        for table, (weight, group) in enumerate(tables):
            if weight.grad is None:
                continue
            if weight.dim() != 2:
                raise ValueError("RowWiseAdagrad updates 2-D tables only")
            state = self.state[weight]
            if "sum" not in state:
                state["sum"] = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device)
                state["step"] = 0
            state["step"] += 1
            rows, grad = _touched_rows(weight.grad)
            grad = grad.float()
            if group["weight_decay"]:
                grad = grad + group["weight_decay"] * weight[rows].float()
            total = state["sum"].index_add_(0, rows, grad.pow(2).mean(1))[rows]
            step = grad / (total.sqrt() + group["eps"]).unsqueeze(1)
            if weight.dtype == torch.float32:
                weight.index_add_(0, rows, step, alpha=-group["lr"])
            else:  # each table and step its own noise
                updated = weight[rows].float().sub_(step, alpha=group["lr"])
                seed = state["step"] * len(tables) + table
                weight.index_copy_(0, rows, stochastic_round(updated, weight.dtype, seed))
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output, keeping the accumulators float32 (torch's loader
        would cast them to a bfloat16 table's dtype)."""
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        sums = {i: s["sum"] for i, s in state_dict["state"].items() if "sum" in s}
        super().load_state_dict(state_dict)
        for saved_id, param in zip(saved_ids, params, strict=False):
            if saved_id in sums:
                self.state[param]["sum"] = sums[saved_id].to(param.device, torch.float32, copy=True)


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """float32 ``x`` rounded to bfloat16 ``dtype`` up or down at random, in proportion to its
    distance from each neighbour (unbiased: the expectation is ``x``); the same ``seed`` gives
    the same rounding.

    Args:
        x: (...) float32 values.
        dtype: torch.bfloat16 (the only 16-bit format whose bits are float32's upper half).
        seed: seeds the rounding noise.

    Returns:
        (...) tensor of ``dtype``.
    """
    if dtype != torch.bfloat16:
        raise ValueError(f"stochastic rounding to {dtype} is not supported (bfloat16 only)")
    generator = torch.Generator(device=x.device).manual_seed(seed)
    noise = torch.randint(0, 1 << 16, x.shape, generator=generator, dtype=torch.int32, device=x.device)
    # float32 -> bfloat16 keeps the upper 16 bits: adding noise to the lower 16 carries into the
    # kept bits with probability (lower bits) / 2**16, then the lower bits are dropped exactly
    bits = (x.contiguous().view(torch.int32) + noise) & -(1 << 16)
    return bits.view(torch.float32).to(dtype)


def _touched_rows(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows (R,), gradients (R, dim)) of a sparse or dense table gradient, each row once; a
    dense gradient's touched rows are those with a non-zero entry."""
    if grad.is_sparse:
        grad = grad.coalesce()
        return grad.indices()[0], grad.values()
    rows = grad.ne(0).any(1).nonzero().squeeze(1)
    return rows, grad[rows]


def check_table_precision(table_optimizer: str, table_dtype: str) -> None:
    """A clear error unless ``table_optimizer`` can update id tables stored as ``table_dtype``:
    low-precision tables need row-wise Adagrad, the optimizer that rounds stochastically."""
    if table_dtype != "float32" and table_optimizer != "rowwise_adagrad":
        raise PoeemError(
            "table_optimizer",
            f"'rowwise_adagrad' for {table_dtype} id tables (it rounds their updates stochastically)",
            repr(table_optimizer),
            "pass --table-optimizer rowwise_adagrad, or keep --table-dtype float32",
        )


def id_tables(model: nn.Module) -> list[nn.Embedding]:
    """The model's id embedding tables (``model.id_tables()``), or none if it names none."""
    tables = getattr(model, "id_tables", None)
    return list(tables()) if callable(tables) else []


class SplitOptimizer:
    """A dense optimizer and a table optimizer stepped together, seen as one optimizer.

    Its state dict is the two state dicts joined (the table's parameter indices follow the
    dense ones, its groups are marked ``"table": True``), so a checkpoint stores it like any
    optimizer and resumes it exactly.
    """

    def __init__(self, dense: torch.optim.Optimizer, table: torch.optim.Optimizer) -> None:
        self.dense, self.table = dense, table

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The dense groups, then the table groups."""
        return self.dense.param_groups + self.table.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients of both parts."""
        self.dense.zero_grad(set_to_none)
        self.table.zero_grad(set_to_none)

    def step(self) -> None:
        """One update of both parts."""
        self.dense.step()
        self.table.step()

    def state_dict(self) -> dict[str, Any]:
        """Both parts' states, the table's parameter indices shifted past the dense ones."""
        dense, table = self.dense.state_dict(), self.table.state_dict()
        shift = sum(len(g["params"]) for g in dense["param_groups"])
        groups = dense["param_groups"] + [
            {**g, "params": [i + shift for i in g["params"]], "table": True} for g in table["param_groups"]
        ]
        state = {**dense["state"], **{i + shift: s for i, s in table["state"].items()}}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore both parts from :meth:`state_dict`'s output."""
        groups = state_dict["param_groups"]
        dense_groups = [g for g in groups if not g.get("table")]
        table_groups = [{k: v for k, v in g.items() if k != "table"} for g in groups if g.get("table")]
        if not table_groups:
            raise ValueError("the checkpoint's optimizer has no table optimizer state")
        shift = sum(len(g["params"]) for g in dense_groups)
        state = {int(i): s for i, s in state_dict["state"].items()}
        self.dense.load_state_dict(
            {"state": {i: s for i, s in state.items() if i < shift}, "param_groups": dense_groups}
        )
        self.table.load_state_dict(
            {
                "state": {i - shift: s for i, s in state.items() if i >= shift},
                "param_groups": [{**g, "params": [i - shift for i in g["params"]]} for g in table_groups],
            }
        )


AnyOptimizer: TypeAlias = "torch.optim.Optimizer | SplitOptimizer"


def build_optimizer(model: nn.Module, cfg: TrainConfig, scaled_groups: bool = True) -> AnyOptimizer:
    """The optimizer of a training run, from ``cfg``'s optimizer settings.

    Parameters of an ``index`` submodule get ``cfg.index_lr`` (None: ``lr``), times the share
    its ``lr_scales()`` gives some of them (the Poeem layer's lists); a model may name
    other submodules' learning rates in ``model.lr_overrides`` ({name: lr}). With
    ``cfg.table_optimizer`` other than "dense", the model's id tables (``model.id_tables()``)
    switch to sparse gradients and get that optimizer at ``cfg.table_lr`` (None: ``lr``);
    everything else gets ``cfg.optimizer``. ``scaled_groups=False`` builds the layout of
    checkpoints saved before the lists had a rate of their own (one group per submodule), to
    read their state (:func:`move_state`).
    """
    table_optimizer, lr, weight_decay = cfg.table_optimizer, cfg.lr, cfg.weight_decay
    index_lr = cfg.index_lr
    every_table = id_tables(model)
    for table in every_table:
        check_table_precision(table_optimizer, str(table.weight.dtype).removeprefix("torch."))
    tables = every_table if table_optimizer != "dense" else []
    table_params = {id(t.weight) for t in tables}
    overrides = {"index": lr if index_lr is None else index_lr, **getattr(model, "lr_overrides", {})}
    groups: list[dict[str, Any]] = []
    sharded = {id(p) for m in model.modules() if isinstance(m, ShardedIdTable) for p in m.parameters()}
    taken: set[int] = table_params | sharded  # sharded tables step in their own backward pass
    for sub_name, sub_lr in overrides.items():
        sub = getattr(model, sub_name, None)
        params = [p for p in sub.parameters() if id(p) not in taken] if isinstance(sub, nn.Module) else []
        scaled = dict(sub.lr_scales()) if scaled_groups and hasattr(sub, "lr_scales") else {}  # lists
        for scale in sorted(set(scaled.values())):
            group = [p for p in params if scaled.get(p) == scale]
            groups.append({"params": group, "lr": sub_lr * scale, "weight_decay": 0.0})
        params = [p for p in params if p not in scaled]
        if params:
            groups.append({"params": params, "lr": sub_lr, "weight_decay": 0.0})
        taken.update(id(p) for p in params + list(scaled))
    groups.insert(0, {"params": [p for p in model.parameters() if id(p) not in taken]})
    dense = _dense_optimizer(groups, cfg.optimizer, lr, weight_decay)
    if not tables:
        if table_optimizer != "dense" and not sharded:
            raise PoeemError(
                "table_optimizer",
                "a model with id embedding tables",
                f"'{table_optimizer}' for {type(model).__name__}, which has none",
                "drop --table-optimizer (text towers have no id tables)",
            )
        return dense
    for table in tables:
        table.sparse = True
    weights = [t.weight for t in tables]
    table_lr = lr if cfg.table_lr is None else cfg.table_lr
    if table_optimizer == "rowwise_adagrad":
        return SplitOptimizer(dense, RowWiseAdagrad(weights, lr=table_lr, weight_decay=weight_decay))
    if table_optimizer == "sparse_adam":
        if weight_decay:
            raise PoeemError(
                "weight_decay",
                "0 with table_optimizer 'sparse_adam' (SparseAdam has none)",
                repr(weight_decay),
                "drop --weight-decay or use --table-optimizer rowwise_adagrad",
            )
        return SplitOptimizer(dense, torch.optim.SparseAdam(weights, lr=table_lr))
    raise PoeemError(
        "table_optimizer", "'dense', 'rowwise_adagrad' or 'sparse_adam'", repr(table_optimizer), "pick one"
    )


def _parts(optimizer: AnyOptimizer) -> list[torch.optim.Optimizer]:
    """The torch optimizers inside ``optimizer``."""
    return [optimizer.dense, optimizer.table] if isinstance(optimizer, SplitOptimizer) else [optimizer]


def move_state(source: AnyOptimizer, target: AnyOptimizer) -> None:
    """Give ``target`` the per-parameter state (moments, step counts) ``source`` holds for the
    same parameters, whatever their grouping; ``target`` keeps its own groups and rates."""
    for old, new in zip(_parts(source), _parts(target), strict=True):
        for param, state in old.state.items():
            new.state[param] = state


def _dense_optimizer(
    groups: list[dict[str, Any]], name: str, lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    """``name``'s torch optimizer over ``groups``, fused (one kernel for all tensors, no
    temporaries: 4-6x faster steps on the CPU) wherever torch has a fused kernel for them."""
    params = [p for group in groups for p in group["params"]]
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params) or None
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay, fused=fused)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=fused)
    if name == "adagrad":
        return torch.optim.Adagrad(groups, lr=lr, weight_decay=weight_decay, fused=fused)
    raise PoeemError("optimizer", "'adam', 'adamw' or 'adagrad'", repr(name), "pick one")
