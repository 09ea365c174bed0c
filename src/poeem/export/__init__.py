"""Zero-training export of the learned index: as tensors, as a FAISS index, or as an index directory."""

from poeem.export.faiss_codec import build_faiss_index
from poeem.export.index_writer import write_index
from poeem.export.learned import export_learned, learned_index, to_faiss

__all__ = ["build_faiss_index", "export_learned", "learned_index", "to_faiss", "write_index"]
