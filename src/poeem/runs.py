"""The run folder: config, final weights and metrics of one training run.

::

    RUN_DIR/config.json              RunConfig plus the vocabulary sizes the model was built with
    RUN_DIR/model.safetensors        final weights (safetensors: loading executes no code)
    RUN_DIR/checkpoint.safetensors   model + optimizer + step, for --resume
    RUN_DIR/metrics.json             evaluation results
    RUN_DIR/log.csv                  training curves
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from poeem.data import DataConfig, InteractionData
from poeem.errors import PoeemError
from poeem.model import ModelConfig, TwoTowerModel
from poeem.training.checkpoint import atomic_write, atomic_write_text
from poeem.training.trainer import TrainConfig


@dataclass
class EvalConfig:
    """What ``poeem evaluate`` measures."""

    ks: tuple[int, ...] = (20, 50, 100)
    nprobes: tuple[int, ...] = (1,)  # IVF lists probed; each gets its own rows
    faiss_baseline: bool = True  # also FAISS IVF-PQ trained on the un-quantized item embeddings
    opq_baseline: bool = False  # also FAISS OPQ + IVF-PQ
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
        try:
            raw = tomllib.loads(path.read_text()) if path.suffix == ".toml" else json.loads(path.read_text())
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as err:
            raise PoeemError(
                f"config file {path}", "valid JSON or TOML", str(err), "fix the syntax"
            ) from None
        return cls.from_dict(raw)


def model_shapes(data: InteractionData) -> dict[str, int]:
    """The vocabulary and feature sizes a model for ``data`` is built with."""
    return {
        "num_queries": data.num_queries,
        "num_items": data.num_items,
        "num_query_features": 0 if data.query_features is None else data.query_features.shape[1],
        "num_item_features": 0 if data.item_features is None else data.item_features.shape[1],
    }


def build_model(
    cfg: ModelConfig, shapes: dict[str, int], item_counts: torch.Tensor | None = None
) -> TwoTowerModel:
    """A fresh :class:`TwoTowerModel` for the given shapes."""
    return TwoTowerModel(
        cfg,
        shapes["num_queries"],
        shapes["num_items"],
        shapes["num_query_features"],
        shapes["num_item_features"],
        item_counts,
    )


def save_run(run_dir: Path, cfg: RunConfig, shapes: dict[str, int]) -> None:
    """Write ``config.json`` (atomically)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.json", json.dumps({**cfg.to_dict(), "shapes": shapes}, indent=2))


def save_weights(run_dir: Path, model: torch.nn.Module) -> None:
    """Write ``model.safetensors`` atomically."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(run_dir / "model.safetensors", lambda tmp: save_file(tensors, str(tmp)))


def load_run(run_dir: str | Path, device: torch.device | str = "cpu") -> tuple[RunConfig, TwoTowerModel]:
    """The config and the trained model (eval mode) of a finished run."""
    run_dir = Path(run_dir)
    config_path, weights = run_dir / "config.json", run_dir / "model.safetensors"
    for path in (config_path, weights):
        if not path.is_file():
            raise PoeemError(
                "run folder",
                f"'{path.name}' inside '{run_dir}'",
                "it is missing",
                "pass the folder 'poeem train' wrote, after training finished",
            )
    raw = json.loads(config_path.read_text())
    cfg = RunConfig.from_dict(raw)
    model = build_model(cfg.model, raw["shapes"])
    model.load_state_dict(load_file(str(weights)))
    return cfg, model.to(device).eval()


def write_metrics(run_dir: Path, metrics: dict[str, Any]) -> None:
    """Write ``metrics.json`` atomically."""
    atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2))
