"""poeem: joint learning of a retrieval model and its product-quantization index."""

from poeem._version import __version__
from poeem.errors import PoeemError
from poeem.index import PoeemConfig, PoeemLayer, PoeemOutput
from poeem.search.searcher import Searcher

__all__ = ["PoeemConfig", "PoeemError", "PoeemLayer", "PoeemOutput", "Searcher", "__version__"]
