"""Evaluation: ranking metrics through exact search, the learned index, or FAISS."""

from poeem.evaluation.evaluate import evaluate_retrieval, search_excluding
from poeem.evaluation.metrics import ranking_metric_sums, ranking_metrics

__all__ = ["evaluate_retrieval", "ranking_metric_sums", "ranking_metrics", "search_excluding"]
