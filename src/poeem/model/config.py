"""The configuration of a retrieval model: towers, scoring, loss, and the Poeem layer."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

from poeem.errors import PoeemError
from poeem.index import PoeemConfig
from poeem.options import (
    Count,
    NonNegative,
    Positive,
    PositiveInt,
    check_keys,
    check_settings,
    setting,
)

TextMode = Literal["frozen", "query", "both"]
TableDtype = Literal["float32", "bfloat16"]
DEFAULT_ENCODER = "all-MiniLM-L6-v2"


def check_table_dtype(value: str) -> None:
    """A clear error unless ``value`` is a :data:`TableDtype`."""
    if value not in get_args(TableDtype):
        raise PoeemError("table_dtype", "'float32' or 'bfloat16'", repr(value), "pick one")


@dataclass
class TextConfig:
    """Which sentence encoder, and what trains."""

    encoder: str = setting(
        DEFAULT_ENCODER,
        help="Text towers (--data beir): a sentence-transformers folder, installed model or cached name.",
        flag="--text-encoder",
    )
    mode: TextMode = setting(
        "frozen", help="Text towers: what fine-tunes (frozen, query or both).", flag="--text-mode"
    )
    max_seq_length: PositiveInt = 256  # tokens per text (longer texts are truncated)
    batch_size: PositiveInt = 64  # texts encoded at once when building the caches
    encoder_lr: NonNegative = 2e-5  # learning rate of a fine-tuned encoder (the heads use train.lr)

    def __post_init__(self) -> None:
        check_settings(self, "model.text")

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable copy."""
        return asdict(self)


@dataclass
class ModelConfig:
    """Architecture and scoring of a retrieval model: id towers, or text towers with ``text``."""

    dim: PositiveInt = setting(64, help="Embedding size.")
    score: Literal["cosine", "dot"] = setting("cosine", help="cosine: both towers L2-normalised; or dot.")
    temperature: Positive = setting(0.1, help="Softmax temperature: logits are score / temperature.")
    logq_correction: bool = setting(
        True, help="logQ popularity correction of the in-batch logits (Yi et al. 2019).", flag="--logq"
    )
    random_negatives: Count = setting(0, help="Uniform item samples added as negatives to every row.")
    # under torch.distributed, score against every rank's positives (N ranks of batch B/N
    # then train like one rank of batch B); else each rank uses its own B/N
    cross_rank_negatives: bool = True
    query_hidden: tuple[PositiveInt, ...] = ()  # MLP widths for numeric query features
    item_hidden: tuple[PositiveInt, ...] = ()
    init_std: Positive = 0.1
    # storage of the id tables: bfloat16 halves them (100M x 64 rows: 12.8 GB instead of 25.6);
    # it needs table_optimizer "rowwise_adagrad", which rounds its updates stochastically
    table_dtype: TableDtype = setting(
        "float32",
        help="Id tables stored as float32 or bfloat16 (half the memory; needs --table-optimizer "
        "rowwise_adagrad).",
    )
    poeem: dict[str, Any] | None = field(default=None)  # PoeemConfig fields; None = baseline
    # TextConfig fields: sentence-transformers towers over the data's texts; None = id towers
    text: dict[str, Any] | None = field(default=None)

    def __post_init__(self) -> None:
        check_settings(self, "model")
        if self.poeem is not None:
            if self.poeem.get("dim", self.dim) != self.dim:
                raise PoeemError(
                    "model.poeem.dim",
                    f"the model's dim ({self.dim})",
                    repr(self.poeem["dim"]),
                    "leave it out: the layer takes model.dim",
                )
            PoeemConfig.from_dict({**self.poeem, "dim": self.dim})  # validate early
        if self.text is not None:
            check_keys(self.text, TextConfig, "model.text")
            TextConfig(**self.text)
            if self.table_dtype != "float32":
                raise PoeemError(
                    "table_dtype", "'float32' for text towers (no id tables)", self.table_dtype, "drop it"
                )

    @property
    def index_schedule(self) -> Literal["joint", "after_training"]:
        """When the layer's index trains (``schedule``, "auto" resolved): text towers, which
        train on few labels, fit and distil it after training; id towers train it jointly."""
        schedule = (self.poeem or {}).get("schedule", "auto")
        if schedule == "auto":
            return "after_training" if self.text is not None else "joint"
        return schedule

    @property
    def search_metric(self) -> Literal["cosine", "ip"]:
        """How the index is searched: "cosine" (normalise queries, then inner product) or "ip"."""
        return "cosine" if self.score == "cosine" else "ip"

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable copy."""
        return asdict(self)
