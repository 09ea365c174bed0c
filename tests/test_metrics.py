import math

import numpy as np
import pytest
import torch

from poeem.data.interactions import CSR, InteractionData
from poeem.evaluation import evaluate_retrieval, ranking_metrics, search_excluding
from poeem.search.exact import FlatIndex


def test_metrics_match_hand_computation() -> None:
    # query 0: relevant at ranks 1 and 3 of 3, 2 relevant in total; query 1: nothing found, 4 relevant
    hits = np.array([[True, False, True], [False, False, False]])
    m = ranking_metrics(hits, np.array([2, 4]), ks=(1, 3))
    assert m["recall@3"] == pytest.approx((2 / 2 + 0) / 2)
    assert m["precision@3"] == pytest.approx((2 / 3 + 0) / 2)
    assert m["precision@1"] == pytest.approx(0.5)
    assert m["hit_rate@3"] == pytest.approx(0.5)
    dcg = 1 + 1 / math.log2(4)
    idcg = 1 + 1 / math.log2(3)
    assert m["ndcg@3"] == pytest.approx((dcg / idcg + 0) / 2)
    assert m["ndcg@1"] == pytest.approx(0.5)


class Scripted:
    """A backend returning a fixed ranking of item ids for every query."""

    def __init__(self, ranking: list[int]) -> None:
        self.ranking = torch.tensor(ranking)

    def search(self, xq: torch.Tensor, k: int, nprobe: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.ranking[:k].expand(xq.shape[0], -1)
        return torch.zeros(ids.shape), ids


def test_training_items_are_excluded_before_cutting_at_k() -> None:
    exclude = CSR.from_pairs(np.array([0, 0]), np.array([5, 3]), num_queries=1)
    ids = search_excluding(Scripted([5, 1, 3, 2, 4]), torch.zeros(1, 2), np.array([0]), 3, 1, exclude, 6)
    assert ids.tolist() == [[1, 2, 4]]


def test_evaluate_retrieval_end_to_end() -> None:
    # 2 users, 4 items; user 0 trained on item 0, test item 2; user 1 test items 1 and 3
    data = InteractionData(
        "toy",
        np.array([0, 1]),
        np.array([0, 0]),
        2,
        4,
        test=CSR.from_pairs(np.array([0, 1, 1]), np.array([2, 1, 3]), 2),
    )
    items = torch.eye(4)
    queries = torch.tensor([[9.0, 0.0, 1.0, 0.5], [0.0, 2.0, 0.0, 1.0]])
    m = evaluate_retrieval(FlatIndex(items), lambda rows: queries[rows], data, ks=(1, 2))
    # user 0 ranks 0 (excluded), 2, 3, 1 -> hit at 1; user 1 ranks 1, 3 -> both relevant
    assert m["precision@1"] == 1.0 and m["recall@2"] == 1.0 and m["precision@2"] == pytest.approx(0.75)


def test_csr_contains_handles_padding_and_unknown_items() -> None:
    truth = CSR.from_pairs(np.array([0, 0, 2]), np.array([4, 1, 3]), num_queries=3)
    items = np.array([[1, 4, -1, 99], [1, 4, 3, 0]])
    assert truth.contains(np.array([0, 2]), items).tolist() == [
        [True, True, False, False],
        [False, False, True, False],
    ]


class Recording(Scripted):
    """A scripted backend that records how many results each call asked for."""

    def __init__(self, ranking: list[int]) -> None:
        super().__init__(ranking)
        self.widths: list[tuple[int, int]] = []

    def search(self, xq: torch.Tensor, k: int, nprobe: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        self.widths.append((xq.shape[0], k))
        return super().search(xq, k, nprobe)


def test_exclusion_memory_is_bounded_by_the_heavy_queries() -> None:
    """Regression: every query of a batch fetched k + the largest exclusion count of the batch."""
    num_items = 2000
    heavy = np.arange(1000)  # query 0 excludes 1000 items, the 99 others exclude one each
    queries = np.concatenate([np.zeros(1000, dtype=np.int64), np.arange(1, 100)])
    items = np.concatenate([heavy, np.full(99, 1500)])
    exclude = CSR.from_pairs(queries, items, num_queries=100)
    backend = Recording(list(range(num_items)))
    ids = search_excluding(backend, torch.zeros(100, 2), np.arange(100), 5, 1, exclude, num_items)
    assert ids[0].tolist() == [1000, 1001, 1002, 1003, 1004]  # the heavy query is still right
    assert ids[1].tolist() == [0, 1, 2, 3, 4]
    assert backend.widths == [(100, 5 + 256), (1, 1005)]  # only the heavy query is re-searched
