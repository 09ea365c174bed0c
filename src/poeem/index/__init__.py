"""The Poeem index layer and its pure quantization functions."""

from poeem.index.config import PoeemConfig
from poeem.index.layer import PoeemLayer, PoeemOutput

__all__ = ["PoeemConfig", "PoeemLayer", "PoeemOutput"]
