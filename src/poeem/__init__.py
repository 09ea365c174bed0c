"""poeem: joint learning of a retrieval model and its product-quantization index."""

from poeem.errors import PoeemError
from poeem.index import PoeemConfig, PoeemLayer, PoeemOutput

__version__ = "0.1.0"

__all__ = ["PoeemConfig", "PoeemError", "PoeemLayer", "PoeemOutput", "__version__"]
