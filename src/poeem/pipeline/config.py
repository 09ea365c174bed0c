"""The configuration of a whole run: data, model, training and evaluation."""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from poeem.data import DataConfig
from poeem.errors import PoeemError
from poeem.index import PoeemConfig
from poeem.model import ModelConfig
from poeem.model.config import TextConfig
from poeem.options import Option, options, setting
from poeem.storage import read_json
from poeem.training.config import TrainConfig
from poeem.training.optimizers import check_table_precision


@dataclass
class EvalConfig:
    """What ``poeem evaluate`` measures."""

    ks: tuple[int, ...] = setting((20, 50, 100), help="Metric cut-offs; repeat.", flag="--k")
    nprobes: tuple[int, ...] = setting((1,), help="IVF lists probed at evaluation; repeat.", flag="--nprobe")
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
    num_coarse: int = 8
    num_subspaces: int = 8
    codebook_size: int = 256


@dataclass
class RunConfig:
    """Everything a run needs: data, model, training and evaluation."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        check_table_precision(self.train.table_optimizer, self.model.table_dtype)  # before any data loads

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable copy."""
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunConfig:
        """Build from nested dicts; unknown sections or keys are a clear error."""
        parts = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "eval": EvalConfig}
        unknown = sorted(set(raw) - set(parts) - {"shapes"})
        if unknown:
            raise PoeemError("run config", f"sections among {sorted(parts)}", f"{unknown}", "remove them")
        built = {}
        for name, klass in parts.items():
            section = dict(raw.get(name) or {})
            known = {f.name for f in fields(klass)}
            bad = sorted(set(section) - known)
            if bad:
                raise PoeemError(
                    f"run config [{name}]",
                    f"keys among {sorted(known)}",
                    f"{bad}",
                    "fix the spelling or remove them",
                )
            for key in ("ks", "nprobes", "query_hidden", "item_hidden"):
                if key in section and isinstance(section[key], list):
                    section[key] = tuple(section[key])
            built[name] = klass(**section)
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
