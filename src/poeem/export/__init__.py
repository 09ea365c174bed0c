"""Zero-training export of the learned index: as tensors, or as a FAISS index."""

from poeem.export.faiss_export import build_faiss_index, to_faiss
from poeem.export.learned import learned_index

__all__ = ["build_faiss_index", "learned_index", "to_faiss"]
