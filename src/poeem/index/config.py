"""Configuration of the Poeem index layer, validated on construction: what the exported index is
(:class:`IndexSpec`) and how the layer trains it (:class:`LayerTraining`), together
:class:`PoeemConfig`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Annotated, Any, Literal

from poeem.errors import PoeemError
from poeem.options import (
    Bounds,
    Count,
    NonNegative,
    Positive,
    PositiveInt,
    Seed,
    check_keys,
    check_settings,
    setting,
)

Rotation = Literal["none", "opq", "givens", "cayley"]
LEARNED_ROTATIONS = ("givens", "cayley")  # trained with the model, on top of an OPQ warm start
SECTION = "model.poeem"  # where the layer's settings go in a run config
# lists of this many items or more train at the index's learning rate; smaller ones proportionally
# slower (list_lr_scale None): measured on MovieLens 100K, Gowalla, Yelp2018 and the synthetic task
ITEMS_PER_LIST_AT_FULL_RATE = 1024
FITTED_CODEBOOK_SIZE = 256  # K of an index fitted on embeddings trained without it


def fitted_codes(given: dict[str, Any]) -> dict[str, int]:
    """The codes of an index fitted after training, from the layer settings ``given``: 8-bit
    codes (K = 256) at the bytes of the settings' D and K, unless ``codebook_size`` is given.
    Fitted after training, 8-bit codes beat 4-bit ones at equal bytes (docs/design.md,
    "Codebook size"); jointly trained, 4-bit ones are the better default."""
    if "codebook_size" in given:
        return {}
    defaults = {f.name: f.default for f in fields(IndexSpec)}
    bits = given.get("num_subspaces", defaults["num_subspaces"]) * 4  # at the default K = 16
    if bits % 8:
        return {}
    return {"num_subspaces": bits // 8, "codebook_size": FITTED_CODEBOOK_SIZE}


MAX_CODEBOOK_SIZE = 1 << 16


@dataclass
class IndexSpec:
    """What an exported index is: its dimension, IVF lists and codes, in the paper's notation.

    The code of an item is one coarse code (coarse_K lists) plus D sub-codes of K codewords,
    so an item costs ``D * log2(K) / 8`` bytes plus its list.
    """

    dim: PositiveInt = setting(
        help="Size of the item embedding; must be divisible by `num_subspaces` for PQ.", cli=False
    )
    # the defaults, D = 16 sub-codes of K = 16 codewords (4 bits, the paper's K), cost 8 bytes per
    # item and export as FAISS's 4-bit fast scan (docs/design.md, "Codebook size")
    num_subspaces: PositiveInt = setting(
        16, help="D: PQ sub-vectors per item (RQ: stages), each log2(K) bits; bytes per item = D log2(K) / 8."
    )
    codebook_size: int = setting(
        16,
        help="K: codewords per sub-vector, a power of two (16 = 4 bits, exported as FAISS fast scan; "
        "256 = 8 bits).",
    )
    quantizer: Literal["pq", "rq"] = setting(
        "pq",
        help="How the residual to the list is coded: pq (D sub-vectors, one codeword each) or rq "
        "(D residual stages over all coordinates: same bytes, lower distortion, D times the "
        "encoding work, no rotation).",
    )
    num_coarse: Count = setting(
        8, help="coarse_K: IVF lists; 0 turns IVF off (a flat PQ that scans everything)."
    )
    coarse_metric: Literal["l2", "ip"] = setting(
        "ip",
        help="How items are assigned to lists: largest inner product (ip) or nearest centroid (l2). "
        "Use the rule the search probes lists by: ip for inner-product and cosine indexes.",
    )
    rotation: Rotation = setting(
        "none",
        help="opq: a fixed OPQ rotation fitted at the warm start; givens: OPQ, then learned in "
        "training as a product of Givens rotations (the paper's; always orthogonal); cayley: the "
        "same rotations near the identity, learned through a Cayley map (built in a fifth of the "
        "Givens product's time at d = 64).",
    )

    @property
    def dsub(self) -> int:
        """Coordinates per subvector, dim / D."""
        return self.dim // self.num_subspaces

    @property
    def codeword_dim(self) -> int:
        """Coordinates per codeword: dim / D for PQ, dim for RQ."""
        return self.dim if self.quantizer == "rq" else self.dsub

    @classmethod
    def of(cls, settings: dict[str, Any]) -> IndexSpec:
        """The spec within a layer's settings (:meth:`PoeemConfig.to_dict` output, e.g. an index
        directory's manifest); the training settings are left out."""
        return IndexSpec(**{f.name: settings[f.name] for f in fields(IndexSpec) if f.name in settings})

    def __post_init__(self) -> None:
        check_settings(self, SECTION)
        self.validate()

    def validate(self) -> None:
        """Raise :class:`PoeemError` on an inconsistent index shape (the types and bounds of
        each setting are checked on construction)."""
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


@dataclass
class LayerTraining:
    """How the layer trains its index: the warm start and its k-means fit, the loss weights, and
    the schedules."""

    coarse_fit: Literal["auto", "kmeans", "equal_norm"] = setting(
        "auto",
        help="How the warm start fits the lists for the ip rule: L2 k-means, or equal-norm spherical "
        "k-means; auto picks equal_norm when item norms vary (dot-product models).",
        cli=False,
    )
    warmup_steps: Count = setting(
        1000, help="Training steps with the layer as the identity, so the towers learn first."
    )
    buffer_size: PositiveInt = setting(
        8192, help="Item embeddings collected after the warm-up to fit k-means (about 40 per centroid)."
    )
    schedule: Literal["auto", "joint", "after_training"] = setting(
        "auto",
        help="joint: the index trains with the model after the warm start (the paper's); "
        "after_training: the towers train alone, then the index is fitted on every item and "
        "distilled from the model's own ranking (JPQ, Distill-VQ: for few labels), with 8-bit codes "
        "at the same bytes unless codebook_size is given; auto: after_training for text towers, "
        "joint otherwise.",
        flag="--index-schedule",
    )
    warm_start_sample: Literal["items", "batches"] = setting(
        "items",
        help="What the warm start's k-means fits: items (each item once: a uniform sample of the "
        "catalogue when the model can embed any item, else the collected batches' items, each "
        "once) or batches (rows as batches bring them, so popular items fill the lists).",
    )
    list_lr_scale: Annotated[float, Bounds(ge=0, le=1)] | None = setting(
        None,
        help="The lists' centroids train at this share of the index's learning rate after the warm "
        "start: 0 keeps them where k-means put them, 1 trains them as the codebooks. None: by the "
        "lists' size, items per list / 1024 (at most 1), so that small lists, which a few popular "
        "items would drag, stay near where k-means put them.",
    )
    init: Literal["kmeans", "random"] = setting(
        "kmeans", help="random (codewords from random buffer rows) is an ablation, not for use.", cli=False
    )
    kmeans_iters: Count = setting(20, help="k-means iterations of the warm-start fit.", cli=False)
    opq_rounds: Count = setting(
        4, help="OPQ alternations (k-means, then Procrustes) of the warm-start fit.", cli=False
    )
    regularizer_weight: NonNegative = setting(
        1.0, help="Weight of the distortion loss that trains the codebooks, centroids and rotation."
    )
    commitment_weight: NonNegative = setting(
        0.0, help="Weight of a term that pulls item embeddings toward their codewords."
    )
    eval_before_init: Literal["raise", "identity"] = setting(
        "raise", help="What eval() does before the index exists: raise, or act as the identity.", cli=False
    )
    seed: Seed = setting(0, help="Seeds the layer's k-means fits.", cli=False)
    # --- training the index for retrieval (docs/design.md, "Closing the gap to exact search")
    routing_weight: NonNegative = setting(
        1.0,
        help="Weight of the routing loss: the query tower learns to probe first the list its "
        "positive item is in (a model of your own adds layer.routing_loss).",
    )
    route_centroids: bool = setting(
        False, help="Let the routing loss move the centroids and rotation too (measured worse).", cli=False
    )
    routing_lists: Literal["auto", "all", "batch"] = setting(
        "auto",
        help="Lists the routing softmax scores: all, or batch (the lists of the batch's positives); "
        "auto: all while coarse_K is at most the global batch.",
    )
    index_task_grad: bool = setting(
        False,
        help="Let the task loss's gradient reach the codebooks and centroids through the "
        "reconstruction (measured worse).",
        cli=False,
    )
    balance_weight: NonNegative = setting(
        0.0, help="Pulls the lists toward equal use; measured to cost more recall than it saves."
    )
    list_temperature: Positive = setting(
        0.1, help="Temperature of the soft list choices of the routing and balance terms.", cli=False
    )
    reseed_after: Count = setting(
        500, help="A codeword or list unused for this many steps moves onto a current item (0: never)."
    )
    unquantized_loss_weight: NonNegative = setting(
        1.0,
        help="The model's task loss also scores the un-quantized items at this weight, which keeps "
        "the towers as good as without the layer.",
    )
    unquantized_schedule: Literal["alternate", "every_step"] = setting(
        "alternate",
        help="When: in turn with the quantized items (one softmax a step), or every_step (both, slower).",
    )
    num_items: Count = setting(
        0,
        help="Remember each item's codes from training (the index as trained, which an export "
        "reuses); a run sets it to its catalogue size. 0: off.",
        cli=False,
    )

    def __post_init__(self) -> None:
        check_settings(self, SECTION)  # each setting's type and bounds are all it needs


@dataclass
class PoeemConfig(LayerTraining, IndexSpec):
    """Hyper-parameters of :class:`poeem.PoeemLayer`: the index it exports (:class:`IndexSpec`)
    and how it is trained (:class:`LayerTraining`), as one flat set of fields."""

    def __post_init__(self) -> None:
        check_settings(self, SECTION)
        self.validate()

    @property
    def spec(self) -> IndexSpec:
        """What the exported index is, without the training settings."""
        return IndexSpec.of(self.to_dict())

    @property
    def list_lr_share(self) -> float:
        """The lists' share of the index's learning rate: ``list_lr_scale``, or when it is None,
        items per list / :data:`ITEMS_PER_LIST_AT_FULL_RATE`, at most 1 (1 without ``num_items``)."""
        if self.list_lr_scale is not None:
            return float(self.list_lr_scale)
        if not self.num_items or not self.num_coarse:
            return 1.0
        return min(1.0, self.num_items / self.num_coarse / ITEMS_PER_LIST_AT_FULL_RATE)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PoeemConfig:
        """Build from :meth:`to_dict` output; unknown keys are a clear error."""
        check_keys(data, cls, SECTION)
        return cls(**data)

    def validate(self) -> None:
        """Raise :class:`PoeemError` on an inconsistent configuration."""
        IndexSpec.validate(self)
        if self.list_lr_share == 0 and self.route_centroids:
            raise PoeemError(
                "route_centroids",
                "False while list_lr_scale is 0 (the lists do not move)",
                "True",
                "drop route_centroids, or let the lists train",
            )
        if self.balance_weight and self.num_coarse and self.list_lr_share == 0:
            raise PoeemError(
                "balance_weight",
                "0 while list_lr_scale is 0 (it moves the lists, which stay where they are)",
                f"balance_weight={self.balance_weight}",
                "drop balance_weight, or let the lists train (list_lr_scale above 0)",
            )
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
