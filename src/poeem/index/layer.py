"""PoeemLayer: the IVF-PQ embedding index as the last layer of an item tower."""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from poeem.distributed import all_reduce_max, broadcast_from_rank0, gather_rows
from poeem.errors import PoeemError
from poeem.index.cayley import CayleyRotation
from poeem.index.config import PoeemConfig
from poeem.index.givens import GivensRotation
from poeem.index.quantize import (
    decode_rotated,
    encode_rotated,
    fit_ivf_pq,
    fit_opq,
    smallest_uint_dtype,
    split_subvectors,
    stage_inputs,
)
from poeem.index.stats import batch_usage_counts, index_stats
from poeem.index.trained_codes import TrainedCodes

WARMUP, COLLECT, QUANTIZE = 0, 1, 2


def _full_precision(x: torch.Tensor) -> torch.autocast:
    """Autocast off for the device of ``x``: codes must not depend on the caller's precision."""
    return torch.autocast(device_type=x.device.type, enabled=False)


PHASE_NAMES = {WARMUP: "warmup", COLLECT: "collect", QUANTIZE: "quantize"}
USAGE_WINDOW = 4096  # rows behind the code-usage statistics of a training step


@dataclass
class PoeemOutput:
    """Result of :meth:`PoeemLayer.forward` on a batch of B items.

    Attributes:
        output: (B, dim), in the input's dtype. Its value is the reconstruction x_hat once
            quantizing (else x itself); its gradient w.r.t. the input is the identity.
        loss: scalar float32 index loss (distortion regularizer plus commitment); 0 before
            quantization starts. Add it to the task loss.
        coarse_codes: (B,) int64 coarse codes, or None (no IVF, or not quantizing).
        codes: (B, D) int64 sub-codes, or None when not quantizing.
        quantized: whether ``output`` is quantized.
        health: computes :attr:`stats` when they are first read (None: no statistics).
    """

    output: torch.Tensor
    loss: torch.Tensor
    coarse_codes: torch.Tensor | None = None
    codes: torch.Tensor | None = None
    quantized: bool = False
    health: Callable[[], dict[str, torch.Tensor]] | None = field(default=None, repr=False)

    @property
    def stats(self) -> dict[str, torch.Tensor]:
        """Index health of this batch, as scalar tensors (see
        :func:`poeem.index.stats.index_stats`); computed when first read, since a training step
        that is not logged never needs them."""
        return self.health() if self.health is not None else {}


class PoeemLayer(nn.Module):
    """Product-quantization index layer (Poeem, SIGIR 2021) with straight-through gradients.

    Phases, counted in training-mode forward calls: ``warmup_steps`` calls as the identity,
    then k-means (or OPQ) fits the index and every later call quantizes. What it fits
    (``warm_start_sample``): with an :attr:`item_embedder` (a model that can embed any item sets
    one; :class:`poeem.model.RetrievalModel` does), a uniform sample of ``buffer_size`` items of
    the catalogue, at once; otherwise the items of the next batches, each once (by the ids passed
    to forward), until ``buffer_size`` batch rows went by; with "batches", those rows as they
    come. Phase, step, buffer and flags are registered buffers, so a checkpoint taken in any
    phase resumes exactly. After initialization the buffer is released (its shape becomes
    (0, dim)).

    Non-finite inputs raise :class:`PoeemError` before they can reach the codebooks.

    Mixed precision: the index parameters and buffers stay float32 when the model is cast
    (``model.to(torch.bfloat16)``, ``.half()``), and autocast is off inside the layer, so codes
    computed in training are the codes computed at export. Half-precision inputs are
    quantized in float32 and the output is returned in the input's dtype.

    Build with keyword arguments (``PoeemLayer(dim=64, num_subspaces=8, ...)``) or a
    :class:`PoeemConfig`.
    """

    def __init__(self, config: PoeemConfig | None = None, **kwargs: Any) -> None:
        super().__init__()
        if config is None:
            config = PoeemConfig.from_dict(kwargs)
        elif kwargs:
            raise PoeemError(
                "PoeemLayer arguments", "a config or keyword arguments", "both", "pass only one of them"
            )
        self.config = c = config
        self.codebooks = nn.Parameter(torch.zeros(c.num_subspaces, c.codebook_size, c.codeword_dim))
        if c.num_coarse > 0:
            self.coarse = nn.Parameter(torch.zeros(c.num_coarse, c.dim))
        else:
            self.register_parameter("coarse", None)
        self.givens = GivensRotation(c.dim) if c.rotation == "givens" else None
        self.cayley = CayleyRotation(c.dim) if c.rotation == "cayley" else None
        self.register_buffer("base_rotation", torch.eye(c.dim))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("phase", torch.tensor(WARMUP if c.warmup_steps else COLLECT))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("buffer", torch.zeros(c.buffer_size, c.dim))
        self.register_buffer("buffer_count", torch.zeros((), dtype=torch.long))  # rows held
        self.register_buffer("buffer_ids", torch.full((c.buffer_size,), -1, dtype=torch.long))
        self.register_buffer("buffer_seen", torch.zeros((), dtype=torch.long))  # batch rows gone by
        # (n,) item ids -> (n, dim) embeddings without gradient: the warm start then fits a uniform
        # sample of the catalogue (set by a model that can embed any item; not saved)
        self.item_embedder: Callable[[torch.Tensor], torch.Tensor] | None = None
        # the last step each codeword and each list coded an item (for reseed_after)
        words = (c.num_subspaces, c.codebook_size)
        self.register_buffer("codeword_last_used", torch.zeros(words, dtype=torch.long))
        self.register_buffer("list_last_used", torch.zeros(c.num_coarse, dtype=torch.long))
        # each item's codes from its latest training step (ids passed to forward)
        self.trained = (
            TrainedCodes(c.num_items, c.num_subspaces, c.codebook_size, c.num_coarse) if c.num_items else None
        )
        self._last_health: Callable[[], dict[str, torch.Tensor]] | None = None
        # the codes of the last USAGE_WINDOW training rows (not saved), for the usage statistics:
        # a last short batch alone would make them look like dying codes
        self._recent_codes: deque[tuple[torch.Tensor | None, torch.Tensor]] = deque()
        self._recent_rows = 0
        # the rotation without gradient, kept until the angles or the base rotation change
        self._rotation_cache: tuple[list[torch.Tensor], torch.Tensor] | None = None

    # ----------------------------------------------------------------- state
    @property
    def is_initialized(self) -> bool:
        """Whether the index has been fitted (by the warm start or :meth:`initialize`)."""
        return bool(self.initialized)

    @property
    def phase_name(self) -> str:
        """'warmup', 'collect' or 'quantize'."""
        return PHASE_NAMES[int(self.phase)]

    @property
    def rotation_matrix(self) -> torch.Tensor:
        """The current (dim, dim) orthogonal rotation R; the index codes x @ R.

        Identity for rotation "none", the OPQ rotation for "opq", and the OPQ rotation times
        the learnable rotation for "givens" and "cayley" (differentiable in its parameters).
        """
        learned = self.learned_rotation
        if learned is None:
            return self.base_rotation
        return self.base_rotation @ learned.matrix()

    @property
    def learned_rotation(self) -> GivensRotation | CayleyRotation | None:
        """The rotation's learnable part (rotation "givens" or "cayley"), else None."""
        return self.givens if self.givens is not None else self.cayley

    def _rotation_inputs(self) -> list[torch.Tensor]:
        """What the rotation is a function of: the learned parameters and the base rotation."""
        assert self.learned_rotation is not None
        return [p.detach() for p in self.learned_rotation.parameters()] + [self.base_rotation]

    def _rotation_is_current(self) -> bool:
        """Whether the cached rotation was built from the current parameter values (compared by
        value: a fused optimizer step, a load or a refit changes them in place)."""
        if self._rotation_cache is None:
            return False
        return all(
            now.shape == then.shape and now.device == then.device and torch.equal(now, then)
            for now, then in zip(self._rotation_inputs(), self._rotation_cache[0], strict=True)
        )

    def _cache_rotation(self, rotation: torch.Tensor) -> torch.Tensor:
        """Keep ``rotation`` (detached) with a copy of the values it was built from."""
        self._rotation_cache = [t.clone() for t in self._rotation_inputs()], rotation.detach()
        return self._rotation_cache[1]

    def _fixed_rotation(self) -> torch.Tensor:
        """:attr:`rotation_matrix` without gradient; a learned rotation is built once per change
        of its parameters, not once per use (a training step codes items and routes queries)."""
        if self.learned_rotation is None:
            return self.base_rotation
        if not self._rotation_is_current():
            with torch.no_grad():
                self._cache_rotation(self.rotation_matrix)
        assert self._rotation_cache is not None
        return self._rotation_cache[1]

    def _step_rotation(self) -> torch.Tensor:
        """The rotation a forward pass codes with: differentiable in the learned rotation while
        autograd records (and then kept, detached, for the rest of the step)."""
        if self.learned_rotation is None or not torch.is_grad_enabled():
            return self._fixed_rotation()
        rotation = self.rotation_matrix
        self._cache_rotation(rotation)
        return rotation

    def lr_scales(self) -> list[tuple[nn.Parameter, float]]:
        """Parameters that train at a share of the index's learning rate: the lists' centroids at
        ``PoeemConfig.list_lr_share`` (when it is below 1 and above 0; at 0 they get no gradient)."""
        share = self.config.list_lr_share
        return [(self.coarse, share)] if self.coarse is not None and 0 < share < 1 else []

    def stats(self) -> dict[str, float]:
        """Index health of the last quantized batch, as floats (empty before quantization)."""
        if self._last_health is None:
            return {}
        return {k: float(v) for k, v in self._last_health().items()}

    def train(self, mode: bool = True) -> PoeemLayer:
        """Training mode; entering it forgets the codes a distillation kept (they fit the
        codewords as distilled, which training moves)."""
        if mode and self.trained is not None:
            self.trained.forget_distilled()
        return super().train(mode)

    def _apply(self, fn: Any, recurse: bool = True) -> PoeemLayer:
        """Module casts move the layer between devices but keep its floats in float32."""

        def keep_float32(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            return out.float() if t.is_floating_point() and out.is_floating_point() else out

        self._recent_codes, self._recent_rows = deque(), 0  # codes live on the old device
        self._rotation_cache = None
        return super()._apply(keep_float32, recurse)

    # ---------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> PoeemOutput:
        """Quantize a batch of item embeddings (see the class docstring for the phases).

        Args:
            x: (B, dim) floating item embeddings; half precision is computed in float32.
            ids: (B,) item ids in [0, num_items), or None. With ``num_items`` set, a
                quantizing training step remembers the codes of these items
                (:attr:`trained`: the index as trained, which an export can take as is).

        Returns:
            :class:`PoeemOutput`.
        """
        self._check_input(x)
        with _full_precision(x):
            out = self._forward(x, ids)
        if self.training and out.quantized and ids is not None and self.trained is not None:
            assert out.codes is not None
            self.trained.record(ids, out.coarse_codes, out.codes, int(self.step))
        return out

    def _forward(self, x: torch.Tensor, ids: torch.Tensor | None) -> PoeemOutput:
        x32 = x.float()
        if self.training:
            self._advance(x32.detach(), ids)
        if not self.is_initialized:
            if not self.training and self.config.eval_before_init == "raise":
                raise PoeemError(
                    "PoeemLayer in eval mode",
                    "an initialized index",
                    f"phase '{self.phase_name}' at step {int(self.step)}",
                    "train past the warm start, call layer.initialize(item_embeddings), or "
                    "build the layer with eval_before_init='identity'",
                )
            return PoeemOutput(output=x, loss=x32.new_zeros(()))
        return self._quantize(x, x32)

    def _advance(self, x: torch.Tensor, ids: torch.Tensor | None) -> None:
        """One training step of the warm-start state machine (and of re-seeding after it)."""
        c = self.config
        step = int(self.step.add_(1))
        if self.is_initialized:
            if c.reseed_after and step % c.reseed_after == 0:
                self._reseed(x)
            return
        if step <= c.warmup_steps or c.schedule == "after_training":  # fitted when training ends
            return
        if c.warm_start_sample == "items" and self.item_embedder is not None and c.num_items:
            self.initialize(self._catalogue_sample(step))
            return
        self.phase.fill_(COLLECT)
        rows = gather_rows(x)
        if c.warm_start_sample == "items" and ids is not None:
            self._collect_items(rows, gather_rows(ids.to(rows.device)))
        else:
            count = int(self.buffer_count)
            take = min(rows.shape[0], c.buffer_size - count)
            self.buffer[count : count + take] = rows[:take]
            self.buffer_count += take
        self.buffer_seen += rows.shape[0]
        if int(self.buffer_seen) >= c.buffer_size:
            self.initialize(_at_least(self.buffer[: int(self.buffer_count)], self._rows_needed()))

    def _rows_needed(self) -> int:
        return max(self.config.codebook_size, self.config.num_coarse)

    def _collect_items(self, rows: torch.Tensor, ids: torch.Tensor) -> None:
        """Hold each item once, at its latest row: (B, dim) ``rows`` of (B,) item ``ids``."""
        ids = ids.long()
        unique, inverse = torch.unique(ids, return_inverse=True)
        latest = torch.zeros_like(unique).scatter_reduce_(
            0, inverse, torch.arange(ids.shape[0], device=ids.device), "amax", include_self=False
        )
        count = int(self.buffer_count)
        found = torch.zeros_like(unique, dtype=torch.bool)
        if count:
            match = self.buffer_ids[:count].unsqueeze(0) == unique.unsqueeze(
                1
            )  # (U, count): collect steps only
            found = match.any(1)
            self.buffer[match.int().argmax(1)[found]] = rows[latest[found]]
        fresh = latest[~found][: self.config.buffer_size - count]
        self.buffer[count : count + fresh.shape[0]] = rows[fresh]
        self.buffer_ids[count : count + fresh.shape[0]] = ids[fresh]
        self.buffer_count += fresh.shape[0]

    @torch.no_grad()
    def _catalogue_sample(self, step: int) -> torch.Tensor:
        """(m, dim) embeddings of m = buffer_size items drawn uniformly from the catalogue (all of
        them when it is smaller; repeated when it holds fewer than K or coarse_K items). The draw
        depends on (seed, step) only, so every rank embeds the same items."""
        assert self.item_embedder is not None
        c = self.config
        g = torch.Generator().manual_seed(c.seed * 1_000_003 + step)
        ids = uniform_sample(c.num_items, min(c.buffer_size, c.num_items), g)
        parts = [self.item_embedder(ids[lo : lo + 65536]) for lo in range(0, ids.shape[0], 65536)]
        return _at_least(torch.cat(parts).detach().float(), self._rows_needed())

    def _quantize(self, x: torch.Tensor, x32: torch.Tensor) -> PoeemOutput:
        c = self.config
        rotation = self._step_rotation()
        xr = x32 @ rotation if c.rotation != "none" else x32  # (B, dim)
        with torch.no_grad():
            coarse = self.coarse.detach() if self.coarse is not None else None
            coarse_codes, codes = encode_rotated(
                xr.detach(), coarse, self.codebooks.detach(), c.coarse_metric
            )
        centroids = self.coarse
        if centroids is not None and not c.list_lr_share:  # the lists stay where the warm start put them
            centroids = centroids.detach()
        recon = decode_rotated(coarse_codes, codes, centroids, self.codebooks, c.dim)
        x_hat = recon @ rotation.T if c.rotation != "none" else recon  # (B, dim)
        rows = x32.shape[0]
        # mean over items of ||x_hat - sg(x)||^2, in one kernel
        loss = (c.regularizer_weight / max(rows, 1)) * F.mse_loss(x_hat, x32.detach(), reduction="sum")
        if c.commitment_weight:
            loss = loss + c.commitment_weight * (x32 - x_hat.detach()).pow(2).sum(-1).mean()
        if c.balance_weight and coarse_codes is not None:
            loss = loss + c.balance_weight * self.balance_loss(xr.detach())
        if self.training and c.reseed_after:
            self._mark_used(coarse_codes, codes)
        window = self._code_window(coarse_codes, codes) if self.training else ((coarse_codes, codes),)
        health = functools.cache(functools.partial(self._health, x32.detach(), x_hat.detach(), window))
        self._last_health = health
        # straight-through estimator: value x_hat, identity gradient to the items; with
        # index_task_grad the task's gradient reaches the index through x_hat as well
        ste = x_hat if c.index_task_grad else x_hat.detach()
        output = ste + (x32 - x32.detach())
        return PoeemOutput(output.to(x.dtype), loss, coarse_codes, codes, quantized=True, health=health)

    # ------------------------------------------------------- list training
    def list_logits(
        self, v: torch.Tensor, index_grad: bool = True, lists: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Soft list choice of vectors under the list rule: (B, dim) -> (B, coarse_K) logits,
        or (B, L) over the given ``lists`` (L,) only.

        Logits are <v R, c_l> / list_temperature for the "ip" rule and
        -||v R - c_l||^2 / list_temperature for "l2"; their argmax is the list the index assigns
        an item to, or probes first for a query. With ``index_grad`` False, no gradient reaches
        the centroids or the rotation (only ``v``).
        """
        c = self.config
        if self.coarse is None:
            raise PoeemError("list_logits()", "a coarse quantizer", "num_coarse=0", "set num_coarse > 0")
        with _full_precision(v):
            rotation = self.rotation_matrix if index_grad else self._fixed_rotation()
            vr = v.float() @ rotation if c.rotation != "none" else v.float()
            coarse = self.coarse if index_grad else self.coarse.detach()
            return self._rotated_list_logits(vr, coarse if lists is None else coarse[lists])

    def _rotated_list_logits(self, vr: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        """(B, dim) rotated vectors, (coarse_K, dim) centroids -> (B, coarse_K) list logits."""
        scores = vr @ coarse.T
        if self.config.coarse_metric == "l2":
            scores = 2 * scores - coarse.pow(2).sum(-1) - vr.pow(2).sum(-1, keepdim=True)
        return scores / self.config.list_temperature

    def task_items(self, x: torch.Tensor, out: PoeemOutput) -> list[tuple[float, torch.Tensor]]:
        """The item embeddings a model's task loss scores this step, each with its weight.

        The task loss on the quantized items (``out.output``, the straight-through estimator)
        trains the towers for the index; the same loss on the un-quantized items ``x``, at
        ``unquantized_loss_weight``, keeps them as good as without the layer. With
        ``unquantized_schedule`` "alternate" a training step scores one of the two, in turn, at
        twice its weight (the same loss in expectation, at the cost of one softmax); with
        "every_step", and outside training, both.

        Args:
            x: (B, dim) the item embeddings given to the layer.
            out: the layer's output for ``x``.

        Returns:
            ``[(weight, items), ...]``, items of shape (B, dim): the task loss is
            ``sum(weight * task_loss(queries, items))``. Before the index quantizes, the
            output alone.
        """
        weight = self.config.unquantized_loss_weight
        if not out.quantized or not weight:
            return [(1.0, out.output)]
        if self.training and self.config.unquantized_schedule == "alternate":
            return [(2.0 * weight, x)] if int(self.step) % 2 == 0 else [(2.0, out.output)]
        return [(1.0, out.output), (weight, x)]

    def routing_loss(self, queries: torch.Tensor, coarse_codes: torch.Tensor) -> torch.Tensor:
        """Routing term: the query's soft list choice against the list of its positive item.

        Weighted by ``routing_weight``; it moves the query tower only (and the centroids and
        the learnable rotation too with ``route_centroids``): the items' codes stay put.

        The softmax runs over every list, or (``routing_lists``) over the lists of the batch's
        positives, all ranks' under torch.distributed: a sampled softmax that scores at most
        (global batch) lists, however many the index has.

        Args:
            queries: (B, dim) query embeddings, as searched.
            coarse_codes: (B,) the list of each query's positive item (``PoeemOutput.coarse_codes``).

        Returns:
            Scalar float32 loss (0 while the index is not quantizing or the weight is 0).
        """
        c = self.config
        if not c.routing_weight or not self.is_initialized:
            return queries.new_zeros((), dtype=torch.float32)
        targets = coarse_codes.long()
        if c.routing_lists != "all":
            every = gather_rows(targets)  # all ranks' positives: every rank decides alike
            if c.routing_lists == "batch" or c.num_coarse > every.shape[0]:
                lists = torch.unique(every)  # sorted
                logits = self.list_logits(queries, index_grad=c.route_centroids, lists=lists)
                return c.routing_weight * F.cross_entropy(logits, torch.searchsorted(lists, targets))
        logits = self.list_logits(queries, index_grad=c.route_centroids)
        return c.routing_weight * F.cross_entropy(logits, targets)

    def balance_loss(self, xr: torch.Tensor) -> torch.Tensor:
        """KL(mean soft list assignment of a batch || uniform); 0 when lists are equally used.

        Args:
            xr: (B, dim) rotated item embeddings (no gradient reaches them).

        Returns:
            Scalar loss whose gradient moves the centroids only.
        """
        mean_p = torch.softmax(self._rotated_list_logits(xr, self.coarse), dim=-1).mean(0)
        return (mean_p * (mean_p * self.config.num_coarse).clamp_min(1e-12).log()).sum()

    # ------------------------------------------------------------ re-seeding
    def _code_window(
        self, coarse_codes: torch.Tensor | None, codes: torch.Tensor
    ) -> tuple[tuple[torch.Tensor | None, torch.Tensor], ...]:
        """The codes of the last :data:`USAGE_WINDOW` training rows, this batch's included: the
        batches are kept as they come and counted only when statistics are read."""
        self._recent_codes.append((coarse_codes, codes))
        self._recent_rows += codes.shape[0]
        while self._recent_rows - self._recent_codes[0][1].shape[0] >= USAGE_WINDOW:
            self._recent_rows -= self._recent_codes.popleft()[1].shape[0]
        return tuple(self._recent_codes)

    @torch.no_grad()
    def _health(
        self,
        x: torch.Tensor,
        x_hat: torch.Tensor,
        window: tuple[tuple[torch.Tensor | None, torch.Tensor], ...],
    ) -> dict[str, torch.Tensor]:
        """:func:`index_stats` of a batch (B, dim) ``x`` and ``x_hat``, with the code usage of
        ``window``: (coarse codes (n,) or None, sub-codes (n, D)) of recent batches."""
        c = self.config
        lists = torch.cat([cc for cc, _ in window]) if window[0][0] is not None else None
        usage = batch_usage_counts(lists, torch.cat([k for _, k in window]), c.num_coarse, c.codebook_size)
        return index_stats(x, x_hat, usage)

    def _mark_used(self, coarse_codes: torch.Tensor | None, codes: torch.Tensor) -> None:
        offsets = torch.arange(codes.shape[1], device=codes.device) * self.config.codebook_size
        self.codeword_last_used.view(-1).index_fill_(0, (codes + offsets).reshape(-1), self.step)
        if coarse_codes is not None:
            self.list_last_used.index_fill_(0, coarse_codes, self.step)
        all_reduce_max(self.codeword_last_used)  # every rank's usage: replicas stay identical
        all_reduce_max(self.list_last_used)

    @torch.no_grad()
    def _reseed(self, x: torch.Tensor) -> None:
        """Move codewords and lists unused for ``reseed_after`` steps onto this step's items.

        A dead list's centroid becomes an item embedding (at the mean centroid norm for the
        "ip" rule); a dead codeword becomes an item's residual subvector, so that item takes it
        at once. Under torch.distributed the usage was merged every step, the rows are gathered,
        and the random picks depend on (seed, step) only, so every rank re-seeds alike.
        """
        c = self.config
        step = int(self.step)
        dead_words = (step - self.codeword_last_used) >= c.reseed_after  # (D, K)
        dead_lists = (step - self.list_last_used) >= c.reseed_after  # (coarse_K,)
        if not bool(dead_words.any()) and not bool(dead_lists.any()):
            return
        xr = gather_rows(x).to(self.codebooks.device)
        xr = xr @ self._fixed_rotation() if c.rotation != "none" else xr
        g = torch.Generator().manual_seed(c.seed * 1_000_003 + step)
        if self.coarse is not None and bool(dead_lists.any()):
            lists = dead_lists.nonzero()[:, 0]
            rows = xr[torch.randint(xr.shape[0], (lists.numel(),), generator=g).to(xr.device)]
            if c.coarse_metric == "ip":
                rows = F.normalize(rows, dim=-1) * self.coarse.norm(dim=-1).mean()
            self.coarse[lists] = rows
            self.list_last_used[lists] = step
        coarse = self.coarse.detach() if self.coarse is not None else None
        coarse_codes, codes = encode_rotated(xr, coarse, self.codebooks, c.coarse_metric)
        residual = xr - coarse[coarse_codes] if coarse is not None else xr
        sub = stage_inputs(residual, codes, self.codebooks)  # (D, n, dsub or dim)
        d, k = dead_words.nonzero(as_tuple=True)
        pick = torch.randint(xr.shape[0], (d.numel(),), generator=g).to(xr.device)
        self.codebooks[d, k] = sub[d, pick]
        self.codeword_last_used[d, k] = step
        if self.trained is not None:  # items coded with what moved have no valid codes now
            self.trained.forget(dead_lists.nonzero()[:, 0] if self.coarse is not None else None, (d, k))

    # ------------------------------------------------------------ initialise
    @torch.no_grad()
    def initialize(self, x: torch.Tensor, progress: bool = False) -> None:
        """Fit the index on item embeddings and switch to quantization.

        Runs OPQ (rotation "opq", "givens" or "cayley") or plain k-means: coarse centroids first, then PQ
        codebooks on the residuals. Under torch.distributed, rank 0's result is broadcast.

        Args:
            x: (n, dim) item embeddings, n >= max(K, coarse_K).
            progress: show k-means progress bars.
        """
        self._check_input(x)
        with _full_precision(x):
            self._initialize(x, progress)

    def _initialize(self, x: torch.Tensor, progress: bool) -> None:
        c = self.config
        needed = max(c.codebook_size, c.num_coarse)
        if x.shape[0] < needed:
            raise PoeemError(
                "initialize()",
                f"at least max(K, coarse_K) = {needed} embeddings",
                f"{x.shape[0]}",
                "pass more item embeddings",
            )
        x = x.detach().float().to(self.codebooks.device)
        if c.init == "random":
            rotation, coarse, codebooks = self._random_init(x)
        elif c.rotation == "none":
            rotation = torch.eye(c.dim, device=x.device)
            coarse, codebooks = fit_ivf_pq(
                x,
                c.num_coarse,
                c.num_subspaces,
                c.codebook_size,
                c.kmeans_iters,
                c.seed,
                progress,
                c.coarse_metric,
                c.coarse_fit,
                c.quantizer,
            )
        else:
            rotation, coarse, codebooks = fit_opq(
                x,
                c.num_coarse,
                c.num_subspaces,
                c.codebook_size,
                c.kmeans_iters,
                c.opq_rounds,
                c.seed,
                progress,
                c.coarse_metric,
                c.coarse_fit,
            )
        self._install(rotation, coarse, codebooks)

    @torch.no_grad()
    def initialize_from(
        self, rotation: torch.Tensor, coarse: torch.Tensor | None, codebooks: torch.Tensor
    ) -> None:
        """Start quantizing with a given index instead of fitting one (e.g. a FAISS IVF-PQ's).

        Args:
            rotation: (dim, dim) orthogonal R (the index codes x @ R); the learned rotation of
                a "givens" or "cayley" layer starts at the identity on top of it.
            coarse: (coarse_K, dim) centroids, or None for a layer without lists.
            codebooks: (D, K, dsub) codewords ((D, K, dim) for the residual quantizer).
        """
        c = self.config
        expected = {
            "rotation": ((c.dim, c.dim), rotation),
            "coarse": ((c.num_coarse, c.dim) if c.num_coarse else None, coarse),
            "codebooks": ((c.num_subspaces, c.codebook_size, c.codeword_dim), codebooks),
        }
        for name, (shape, t) in expected.items():
            got = None if t is None else tuple(t.shape)
            if got != shape:
                raise PoeemError(
                    f"initialize_from {name}", f"shape {shape}", f"shape {got}", "match the config"
                )
            if t is not None and not bool(torch.isfinite(t).all()):
                raise PoeemError(f"initialize_from {name}", "finite values", "NaN or inf", "check the index")
        eye = torch.eye(c.dim, dtype=torch.float64)
        if not torch.allclose(rotation.double().T @ rotation.double(), eye, atol=1e-4):
            raise PoeemError(
                "initialize_from rotation", "an orthogonal matrix", "R^T R != I", "pass a rotation"
            )
        device = self.codebooks.device
        self._install(
            rotation.float().to(device),
            None if coarse is None else coarse.float().to(device),
            codebooks.float().to(device),
        )

    def _install(self, rotation: torch.Tensor, coarse: torch.Tensor | None, codebooks: torch.Tensor) -> None:
        """Copy in a fitted index and switch to quantization (rank 0's, under torch.distributed)."""
        c = self.config
        self.base_rotation.copy_(rotation)
        self.codebooks.copy_(codebooks)
        if self.coarse is not None and coarse is not None:
            self.coarse.copy_(coarse)
        if self.learned_rotation is not None:
            for p in self.learned_rotation.parameters():
                p.zero_()
        self.codeword_last_used.fill_(int(self.step))
        self.list_last_used.fill_(int(self.step))
        if self.trained is not None:
            self.trained.forget()
        broadcast_from_rank0([p for p in (self.base_rotation, self.codebooks, self.coarse) if p is not None])
        self.initialized.fill_(True)
        self.phase.fill_(QUANTIZE)
        self.buffer = self.buffer.new_zeros(0, c.dim)  # release the warm-start buffer
        self.buffer_ids = self.buffer_ids.new_zeros(0)
        self.buffer_count.zero_()
        self.buffer_seen.zero_()

    def _random_init(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Ablation: codewords are random rows (coarse) and random residual subvectors."""
        c = self.config
        g = torch.Generator().manual_seed(c.seed)
        coarse = None
        if c.num_coarse:
            coarse = x[torch.randperm(x.shape[0], generator=g)[: c.num_coarse].to(x.device)]
        residual = x - coarse[0] if coarse is not None else x
        if c.quantizer == "rq":  # every stage starts from the residual
            sub = residual.expand(c.num_subspaces, -1, -1)
        else:
            sub = split_subvectors(residual, c.num_subspaces)
        pick = torch.randint(x.shape[0], (c.num_subspaces, c.codebook_size), generator=g)
        codebooks = sub[torch.arange(c.num_subspaces).unsqueeze(1), pick.to(x.device)]
        return torch.eye(c.dim, device=x.device), coarse, codebooks

    # ------------------------------------------------------- encode / decode
    @torch.no_grad()
    def encode(
        self, x: torch.Tensor, batch_size: int = 65536, lists: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Codes of item embeddings with the current index, in batches.

        Args:
            x: (n, dim) item embeddings.
            lists: (n,) coarse codes to keep (for example those training assigned): only the
                sub-codes of each item's residual to its given list are computed, skipping the
                list search. None assigns the lists too.

        Returns:
            coarse_codes: (n,) in the smallest integer dtype holding coarse_K, or None without
            IVF; codes: (n, D) in the smallest integer dtype holding K (uint8 for K <= 256).
        """
        self._check_input(x)
        self._require_initialized("encode()")
        c = self.config
        if lists is not None:
            self._check_lists(lists, x.shape[0])
        rotation = self._fixed_rotation()
        coarse = self.coarse.detach() if self.coarse is not None else None
        coarse_parts, code_parts = [], []
        for start in range(0, x.shape[0], batch_size):
            with _full_precision(x):
                xr = x[start : start + batch_size].float().to(rotation.device) @ rotation
                given = lists[start : start + batch_size].to(rotation.device) if lists is not None else None
                cc, codes = encode_rotated(
                    xr, coarse, self.codebooks.detach(), c.coarse_metric, bulk=True, lists=given
                )
            code_parts.append(codes.to(smallest_uint_dtype(c.codebook_size)))
            if cc is not None:
                coarse_parts.append(cc.to(smallest_uint_dtype(c.num_coarse)))
        codes = (
            torch.cat(code_parts)
            if code_parts
            else torch.zeros(0, c.num_subspaces, dtype=smallest_uint_dtype(c.codebook_size))
        )
        coarse_codes = torch.cat(coarse_parts) if coarse_parts else None
        if coarse is not None and coarse_codes is None:
            coarse_codes = torch.zeros(0, dtype=smallest_uint_dtype(c.num_coarse))
        return coarse_codes, codes

    @torch.no_grad()
    def decode(
        self, coarse_codes: torch.Tensor | None, codes: torch.Tensor, batch_size: int = 65536
    ) -> torch.Tensor:
        """Reconstructions x_hat in the original (un-rotated) space.

        Args:
            coarse_codes: (n,) integer coarse codes, or None without IVF.
            codes: (n, D) integer sub-codes.

        Returns:
            (n, dim) float32 reconstructions; equal to the forward output for the same items.
        """
        self._require_initialized("decode()")
        c = self.config
        if codes.dim() != 2 or codes.shape[1] != c.num_subspaces:
            raise PoeemError(
                "decode() codes",
                f"shape (n, {c.num_subspaces})",
                f"shape {tuple(codes.shape)}",
                "pass codes from encode()",
            )
        if (coarse_codes is None) != (self.coarse is None):
            raise PoeemError(
                "decode() coarse_codes",
                "coarse codes exactly when num_coarse > 0",
                f"coarse_codes={'None' if coarse_codes is None else 'a tensor'}, num_coarse={c.num_coarse}",
                "pass what encode() returned",
            )
        rotation = self._fixed_rotation()
        device = rotation.device
        parts = []
        for start in range(0, codes.shape[0], batch_size):
            cc = (
                coarse_codes[start : start + batch_size].to(device).long()
                if coarse_codes is not None
                else None
            )
            with _full_precision(rotation):
                recon = decode_rotated(
                    cc,
                    codes[start : start + batch_size].to(device).long(),
                    self.coarse,
                    self.codebooks,
                    c.dim,
                )
                parts.append(recon @ rotation.T)
        return torch.cat(parts) if parts else torch.zeros(0, c.dim, device=device)

    # ------------------------------------------------------------- checking
    def _check_input(self, x: torch.Tensor) -> None:
        dim = self.config.dim
        if not isinstance(x, torch.Tensor):
            raise PoeemError(
                "PoeemLayer input", "a torch.Tensor", type(x).__name__, "convert with torch.as_tensor(x)"
            )
        if x.dim() != 2 or x.shape[1] != dim:
            raise PoeemError(
                "PoeemLayer input",
                f"shape (batch, {dim})",
                f"shape {tuple(x.shape)}",
                f"make the item tower output {dim} features, or build the layer "
                f"with dim={x.shape[-1] if x.dim() else '?'}",
            )
        if not x.is_floating_point():
            raise PoeemError(
                "PoeemLayer input", "a floating-point tensor", str(x.dtype), "cast with x.float()"
            )
        # one reduction per batch; the rows are counted only when it is not finite
        if not bool(torch.isfinite(x.sum(dtype=torch.float32))):
            bad = int((~torch.isfinite(x)).any(-1).sum())
            if bad:
                raise PoeemError(
                    "PoeemLayer input",
                    "finite values",
                    f"NaN or inf in {bad} rows",
                    "check the item tower (learning rate, normalisation) for divergence",
                )
            raise PoeemError(
                "PoeemLayer input",
                "values whose sums and squared distances fit float32",
                f"values up to {float(x.abs().max()):.3g}",
                "scale or normalise the item embeddings",
            )

    def _check_lists(self, lists: torch.Tensor, n: int) -> None:
        num_coarse = self.config.num_coarse
        if num_coarse == 0:
            raise PoeemError(
                "encode() lists", "no lists (the layer has num_coarse 0)", "a tensor", "pass lists=None"
            )
        if lists.shape != (n,) or lists.is_floating_point() or lists.is_complex():
            raise PoeemError(
                "encode() lists",
                f"an integer tensor of shape ({n},)",
                f"{lists.dtype} of shape {tuple(lists.shape)}",
                "pass one coarse code per item, as encode() returns them",
            )
        if n and not (int(lists.min()) >= 0 and int(lists.max()) < num_coarse):
            raise PoeemError(
                "encode() lists",
                f"coarse codes in [0, {num_coarse})",
                f"values in [{int(lists.min())}, {int(lists.max())}]",
                "pass coarse codes of this layer",
            )

    def _require_initialized(self, what: str) -> None:
        if not self.is_initialized:
            raise PoeemError(
                what,
                "an initialized index",
                f"phase '{self.phase_name}'",
                "train past the warm start or call layer.initialize(x) first",
            )

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        own = self.state_dict()
        for key in ("codeword_last_used", "list_last_used"):  # absent from older checkpoints
            if prefix + key not in state_dict and prefix + "step" in state_dict:
                state_dict[prefix + key] = torch.full_like(own[key], int(state_dict[prefix + "step"]))
        if prefix + "buffer_seen" not in state_dict and prefix + "buffer_count" in state_dict:
            held = state_dict[prefix + "buffer"].shape[0]  # an older layer held every row it saw
            state_dict[prefix + "buffer_seen"] = state_dict[prefix + "buffer_count"].clone()
            state_dict[prefix + "buffer_ids"] = torch.full((held,), -1, dtype=torch.long)
        mismatched = []
        for key, value in own.items():
            incoming = state_dict.get(prefix + key)
            if incoming is None or incoming.shape == value.shape:
                continue
            if key == "buffer" and incoming.shape in {
                (0, self.config.dim),
                (self.config.buffer_size, self.config.dim),
            }:
                self.buffer = self.buffer.new_zeros(incoming.shape)  # released or still filling
                continue
            if key == "buffer_ids" and incoming.shape in {(0,), (self.config.buffer_size,)}:
                self.buffer_ids = self.buffer_ids.new_zeros(incoming.shape)
                continue
            mismatched.append(f"{key}: checkpoint {tuple(incoming.shape)} vs layer {tuple(value.shape)}")
        if mismatched:
            raise PoeemError(
                "PoeemLayer state_dict",
                f"tensors shaped for this layer's config ({self.config})",
                "; ".join(mismatched),
                "build the layer with the config the checkpoint was saved with",
            )
        super()._load_from_state_dict(state_dict, prefix, *args)


def uniform_sample(n: int, m: int, generator: torch.Generator) -> torch.Tensor:
    """(m,) distinct ids drawn uniformly from [0, n), m <= n, in memory O(m) when m << n."""
    if n <= 4 * m:
        return torch.randperm(n, generator=generator)[:m]
    drawn = torch.empty(0, dtype=torch.long)
    while drawn.shape[0] < m:  # repeats are rare (m << n): one more draw at most, as a rule
        drawn = torch.unique(torch.cat([drawn, torch.randint(n, (m + m // 8 + 16,), generator=generator)]))
    return drawn[torch.randperm(drawn.shape[0], generator=generator)[:m]]


def _at_least(x: torch.Tensor, n: int) -> torch.Tensor:
    """(max(len(x), n), dim): ``x``, its rows repeated when it has fewer than n (a catalogue
    smaller than K or coarse_K; k-means then repairs the duplicate centroids)."""
    if x.shape[0] >= n or x.shape[0] == 0:
        return x
    return x.repeat(-(-n // x.shape[0]), 1)[:n]
