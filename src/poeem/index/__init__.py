"""The Poeem index layer and its pure quantization functions."""

from poeem.index.config import IndexSpec, LayerTraining, PoeemConfig
from poeem.index.layer import PoeemLayer, PoeemOutput

__all__ = ["IndexSpec", "LayerTraining", "PoeemConfig", "PoeemLayer", "PoeemOutput"]
