"""The configuration of a whole run: data, model, training and evaluation."""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from poeem.data import DataConfig
from poeem.errors import PoeemError
from poeem.index import PoeemConfig
from poeem.index.config import IndexSpec
from poeem.model import ModelConfig
from poeem.model.config import TextConfig
from poeem.options import Count, Option, PositiveInt, check_keys, check_settings, options, setting
from poeem.storage import read_json
from poeem.training.config import TrainConfig
from poeem.training.optimizers import check_table_precision


@dataclass
class EvalConfig:
    """What ``poeem evaluate`` measures."""

    ks: tuple[PositiveInt, ...] = setting((20, 50, 100), help="Metric cut-offs; repeat.", flag="--k")
    nprobes: tuple[PositiveInt, ...] = setting(
        (1,), help="IVF lists probed at evaluation; repeat.", flag="--nprobe"
    )
    after_training: bool = setting(
        True,
        help="Evaluate when training ends (in one process: with --table-sharding, rank 0 then holds "
        "the whole tables; turn it off for tables past one machine, and evaluate with 'poeem "
        "evaluate' where they fit).",
        flag="--final-eval",
        resume=True,
    )
    faiss_baseline: bool = True  # also FAISS IVF-PQ trained on the un-quantized item embeddings
    opq_baseline: bool = False  # also FAISS OPQ + IVF-PQ
    lists_ceiling: bool = False  # also the learned lists with float vectors (what perfect codes reach)
    # code budget of the FAISS baseline when the model has no Poeem layer (else the layer's)
    num_coarse: Count = 8
    num_subspaces: PositiveInt = 8
    codebook_size: PositiveInt = 256

    def __post_init__(self) -> None:
        check_settings(self, "eval")
        for name in ("ks", "nprobes"):
            if not getattr(self, name):
                raise PoeemError(f"eval.{name}", "at least one value", "an empty list", f"e.g. {name} = [10]")


@dataclass
class RunConfig:
    """Everything a run needs: data, model, training and evaluation."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        check_settings(self, "")
        check_table_precision(self.train.table_optimizer, self.model.table_dtype)  # before any data loads
        if self.model.poeem is None and (self.eval.faiss_baseline or self.eval.opq_baseline):
            self._check_baseline_budget()

    def _check_baseline_budget(self) -> None:
        """The FAISS baseline of a model without a layer codes with eval's budget: it must be an
        index shape for the model's dim (:class:`IndexSpec`)."""
        e = self.eval
        try:
            IndexSpec(self.model.dim, e.num_subspaces, e.codebook_size, num_coarse=e.num_coarse)
        except PoeemError as err:
            fix = f"{err.fix}; or turn the baseline off (eval.faiss_baseline = false)"
            raise PoeemError(
                f"eval.{err.what} (the FAISS baseline's)", err.expected, err.received, fix
            ) from None

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable copy."""
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunConfig:
        """Build from nested dicts (a config file, ``config.json``); unknown sections or keys and
        values of the wrong type are a clear error (lists become tuples where a setting is one)."""
        if not isinstance(raw, dict):
            raise PoeemError("run config", "a table of sections", type(raw).__name__, "see docs/cli.md")
        check_keys({k: v for k, v in raw.items() if k != "shapes"}, cls, "")
        built = {}
        for field_ in fields(cls):
            section = raw.get(field_.name)
            section = {} if section is None else section
            if not isinstance(section, dict):
                raise PoeemError(
                    f"[{field_.name}]",
                    "a table of settings",
                    repr(section),
                    f"write its settings under [{field_.name}] in TOML, or as an object in JSON",
                )
            klass = field_.default_factory
            check_keys(section, klass, field_.name)  # type: ignore[arg-type]
            built[field_.name] = klass(**section)  # type: ignore[operator]
        return cls(**built)

    @classmethod
    def from_file(cls, path: str | Path) -> RunConfig:
        """Load a ``.json`` or ``.toml`` config file."""
        path = Path(path)
        if not path.is_file():
            raise PoeemError("--config", "an existing .json or .toml file", f"'{path}'", "check the path")
        if path.suffix != ".toml":
            return cls.from_dict(read_json(path, f"config file {path}", "fix the syntax"))
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise PoeemError(f"config file {path}", "valid TOML", str(err), "fix the syntax") from None
        return cls.from_dict(raw)


def run_options() -> list[Option]:
    """Every documented setting of a run, section by section: the flags of ``poeem train``."""
    return [
        *options(DataConfig, "data", "Data"),
        *options(ModelConfig, "model", "Model"),
        *options(TextConfig, "model.text", "Model"),
        *options(PoeemConfig, "model.poeem", "Index layer"),
        *options(TrainConfig, "train", "Training"),
        *options(EvalConfig, "eval", "Evaluation"),
    ]
