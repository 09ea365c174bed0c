"""Zero-training export of the learned index: as tensors, or as a FAISS index."""

from poeem.export.faiss_codec import build_faiss_index
from poeem.export.learned import export_learned, learned_index, to_faiss

__all__ = ["build_faiss_index", "export_learned", "learned_index", "to_faiss"]
