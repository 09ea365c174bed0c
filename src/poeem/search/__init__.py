"""Search backends (exact, torch ADC, FAISS) and the index directory a server loads."""

from poeem.search.adc import TorchIVFPQ
from poeem.search.exact import FlatIndex
from poeem.search.faiss_backend import FaissSearcher
from poeem.search.reader import IndexReader
from poeem.search.searcher import Searcher

__all__ = ["FaissSearcher", "FlatIndex", "IndexReader", "Searcher", "TorchIVFPQ"]
