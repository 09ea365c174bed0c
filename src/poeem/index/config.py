"""Configuration of the Poeem index layer, validated on construction."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

from poeem.errors import PoeemError

Rotation = Literal["none", "opq", "givens"]
MAX_CODEBOOK_SIZE = 1 << 16


@dataclass
class PoeemConfig:
    """Hyper-parameters of :class:`poeem.PoeemLayer`, in the paper's notation.

    The code of an item is one coarse code (coarse_K lists) plus D sub-codes of K codewords,
    so an item costs ``D * log2(K) / 8`` bytes plus its list.
    """

    dim: int  # embedding size; must be divisible by num_subspaces (product quantization)
    # the defaults, D = 16 sub-codes of K = 16 codewords (4 bits, the paper's K), cost 8 bytes
    # per item and export as FAISS's 4-bit fast scan: the fastest index at equal bytes
    # (docs/benchmarks.md, "Recall against queries per second")
    num_subspaces: int = 16  # D: subvectors per item (PQ), or stages (RQ)
    codebook_size: int = 16  # K: codewords per subspace, a power of two in 2..65536
    # how the residual to the list is coded: "pq" product quantization (D subvectors of dim / D
    # coordinates, one codeword each), or "rq" residual quantization (D stages, each codeword
    # spanning all dim coordinates and coding what the stages before it left): same bytes,
    # lower distortion, D times the encoding work; no rotation (RQ does not need one)
    quantizer: Literal["pq", "rq"] = "pq"
    num_coarse: int = 8  # coarse_K: IVF lists; 0 turns the coarse quantizer off
    # list assignment: "l2" nearest centroid, or "ip" largest inner product, the rule by which
    # an inner-product IVF index (FAISS, poeem's ADC) probes lists for a query
    coarse_metric: Literal["l2", "ip"] = "ip"
    # how the warm start fits the coarse centroids for the "ip" rule: "kmeans" (L2 k-means),
    # "equal_norm" (spherical k-means, one shared norm), or "auto": equal_norm when the item
    # norms vary (dot-product models), kmeans when they do not (cosine models)
    coarse_fit: Literal["auto", "kmeans", "equal_norm"] = "auto"
    rotation: Rotation = "none"  # "opq": fixed OPQ rotation; "givens": learnable, OPQ-initialised
    warmup_steps: int = 1000  # training steps with the layer as identity
    buffer_size: int = 8192  # item embeddings collected after warm-up for k-means
    init: Literal["kmeans", "random"] = "kmeans"  # "random": codewords are random buffer rows
    kmeans_iters: int = 20
    opq_rounds: int = 4  # OPQ alternations (k-means, then Procrustes) in the warm start
    regularizer_weight: float = 1.0  # weight of ||x_hat - sg(x)||^2, trains the index
    commitment_weight: float = 0.0  # weight of ||x - sg(x_hat)||^2, pulls items to codewords
    eval_before_init: Literal["raise", "identity"] = "raise"  # eval() before k-means
    seed: int = 0
    # --- training the index for retrieval (docs/design.md, "Closing the gap to exact search")
    # routing loss: cross-entropy of the query's soft list choice against its positive's list;
    # the model adds it when it calls PoeemLayer.routing_loss (it moves the query tower, and
    # the centroids and rotation too with route_centroids); nothing to route without lists
    routing_weight: float = 1.0
    route_centroids: bool = False
    # lists the routing softmax scores: "all", or "batch" (the lists of the batch's positives, a
    # sampled softmax whose cost grows with the batch, not with coarse_K); "auto": "all" while
    # coarse_K <= the global batch, else "batch"
    routing_lists: Literal["auto", "all", "batch"] = "auto"
    # retrieval-aware index: the task loss's gradient reaches codebooks and centroids through
    # the reconstruction (the items still get the straight-through identity)
    index_task_grad: bool = False
    balance_weight: float = 0.0  # KL(mean soft list assignment || uniform), moves the centroids
    list_temperature: float = 0.1  # temperature of the soft list assignments of both terms
    reseed_after: int = 500  # re-seed a codeword or list unused for this many steps (0: never)
    # keep the towers whole: the model's task loss also scores the un-quantized items, at
    # this weight (RetrievalModel does it; a model of your own asks PoeemLayer.task_items)
    unquantized_loss_weight: float = 1.0
    # when the task loss scores them: "alternate" (even steps the un-quantized items, odd steps
    # the quantized ones, each at twice its weight: the same loss in expectation, one softmax per
    # step) or "every_step" (both softmaxes every step: on Gowalla 1.9x a step without the layer)
    unquantized_schedule: Literal["alternate", "every_step"] = "alternate"
    # remember each item's codes from training (item ids passed to forward, in [0, num_items)):
    # the index as trained, which an export takes instead of encoding every item; 0: off
    num_items: int = 0

    def __post_init__(self) -> None:
        self.validate()

    @property
    def dsub(self) -> int:
        """Coordinates per subvector, dim / D."""
        return self.dim // self.num_subspaces

    @property
    def codeword_dim(self) -> int:
        """Coordinates per codeword: dim / D for PQ, dim for RQ."""
        return self.dim if self.quantizer == "rq" else self.dsub

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PoeemConfig:
        """Build from :meth:`to_dict` output; unknown keys are a clear error."""
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise PoeemError(
                "PoeemConfig",
                f"keys among {sorted(cls.__dataclass_fields__)}",
                f"unknown keys {unknown}",
                "remove or rename them",
            )
        return cls(**data)

    def validate(self) -> None:
        """Raise :class:`PoeemError` on an inconsistent configuration."""
        if self.dim < 1 or self.num_subspaces < 1:
            raise PoeemError(
                "dim and num_subspaces",
                "positive integers",
                f"dim={self.dim}, num_subspaces={self.num_subspaces}",
                "pass positive sizes",
            )
        if self.quantizer not in ("pq", "rq"):
            raise PoeemError("quantizer", "'pq' or 'rq'", repr(self.quantizer), "pick one of those")
        if self.quantizer == "rq" and self.rotation != "none":
            raise PoeemError(
                "rotation",
                "'none' with the residual quantizer (its codewords span every coordinate)",
                repr(self.rotation),
                "drop the rotation, or use quantizer 'pq'",
            )
        if self.quantizer == "pq" and self.dim % self.num_subspaces:
            raise PoeemError(
                "num_subspaces",
                f"a divisor of dim={self.dim}",
                f"num_subspaces={self.num_subspaces}",
                "pick D such that dim % D == 0, e.g. 8 for dim 64",
            )
        k = self.codebook_size
        if not 2 <= k <= MAX_CODEBOOK_SIZE or k & (k - 1):
            raise PoeemError(
                "codebook_size",
                f"K a power of two between 2 and {MAX_CODEBOOK_SIZE} (a code is log2(K) bits, "
                "and FAISS stores whole bits)",
                f"K={k}",
                "use e.g. K=256 (8 bits) or K=16 (4 bits)",
            )
        if self.num_coarse < 0:
            raise PoeemError(
                "num_coarse",
                "coarse_K >= 0 (0 turns IVF off)",
                f"{self.num_coarse}",
                "pass a non-negative number of lists",
            )
        if self.rotation not in ("none", "opq", "givens"):
            raise PoeemError(
                "rotation", "'none', 'opq' or 'givens'", repr(self.rotation), "pick one of those"
            )
        if self.coarse_metric not in ("l2", "ip"):
            raise PoeemError("coarse_metric", "'l2' or 'ip'", repr(self.coarse_metric), "pick one of those")
        if self.coarse_fit not in ("auto", "kmeans", "equal_norm"):
            raise PoeemError(
                "coarse_fit", "'auto', 'kmeans' or 'equal_norm'", repr(self.coarse_fit), "pick one of those"
            )
        if self.routing_lists not in ("auto", "all", "batch"):
            raise PoeemError(
                "routing_lists", "'auto', 'all' or 'batch'", repr(self.routing_lists), "pick one of those"
            )
        if self.init not in ("kmeans", "random"):
            raise PoeemError("init", "'kmeans' or 'random'", repr(self.init), "pick one of those")
        if self.eval_before_init not in ("raise", "identity"):
            raise PoeemError(
                "eval_before_init", "'raise' or 'identity'", repr(self.eval_before_init), "pick one of those"
            )
        for name in (
            "regularizer_weight",
            "commitment_weight",
            "routing_weight",
            "balance_weight",
            "unquantized_loss_weight",
        ):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise PoeemError(
                    name, "a finite number >= 0", repr(value), "a weight of 0 turns the term off"
                )
        if self.unquantized_schedule not in ("alternate", "every_step"):
            raise PoeemError(
                "unquantized_schedule",
                "'alternate' or 'every_step'",
                repr(self.unquantized_schedule),
                "pick one of those",
            )
        if not math.isfinite(self.list_temperature) or self.list_temperature <= 0:
            raise PoeemError("list_temperature", "a positive number", repr(self.list_temperature), "e.g. 0.1")
        if self.balance_weight and self.num_coarse == 0:
            raise PoeemError(
                "balance_weight",
                "a coarse quantizer (num_coarse > 0) to balance",
                f"balance_weight={self.balance_weight}, num_coarse=0",
                "set num_coarse, or leave balance_weight at 0",
            )
        needed = max(self.codebook_size, self.num_coarse)
        if self.buffer_size < needed:
            raise PoeemError(
                "buffer_size",
                f"at least max(K, coarse_K) = {needed} embeddings",
                f"buffer_size={self.buffer_size}",
                f"set buffer_size >= {needed} (10-50x that is better)",
            )
        if not isinstance(self.num_items, int) or self.num_items < 0:
            raise PoeemError(
                "num_items",
                "an integer >= 0 (0: no trained codes)",
                repr(self.num_items),
                "pass the catalogue size",
            )
        if min(self.warmup_steps, self.kmeans_iters, self.opq_rounds, self.reseed_after) < 0:
            raise PoeemError(
                "warmup_steps, kmeans_iters, opq_rounds, reseed_after",
                "non-negative integers",
                f"{self.warmup_steps}, {self.kmeans_iters}, {self.opq_rounds}, {self.reseed_after}",
                "pass values >= 0",
            )
