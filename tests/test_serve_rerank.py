"""The service's ``"rerank"`` field: re-ranked answers equal the searcher's, and nonsense or
an index without stored vectors gets a clear 4xx."""

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import Server, tiny_config

from poeem import Searcher
from poeem.pipeline import export_run, train_run
from poeem.pipeline.recipe import IndexRecipe


@pytest.fixture(scope="module")
def indexes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two index directories of one tiny run: with sq8 vectors, and codes only."""
    tmp = tmp_path_factory.mktemp("serve-rerank")
    train_run(tiny_config(), tmp / "run")
    export_run(tmp / "run", tmp / "with", recipe=IndexRecipe(rerank="sq8"))
    export_run(tmp / "run", tmp / "without")
    return tmp / "with", tmp / "without"


@pytest.fixture(scope="module")
def server(indexes: tuple[Path, Path]) -> Iterator[Server]:
    s = Server(indexes[0], None, "--max-rerank-candidates", "200")
    yield s
    s.stop()


def test_rerank_answers_equal_the_searchers(server: Server, indexes: tuple[Path, Path]) -> None:
    searcher = Searcher.load(indexes[0])
    xq = searcher.embed_queries(np.array([3, 12]))
    for factor in (None, 0, 1, 2.5, 8):
        body = {"queries": [{"id": 3}, {"id": 12, "exclude": [1, 2]}], "k": 5, "nprobe": 2}
        if factor is not None:
            body["rerank"] = factor
        status, answer = server.call("POST", "/search", body)
        assert status == 200, answer
        _, ids = searcher.search(xq, 5, nprobe=2, rerank=factor, exclude=[[], [1, 2]])
        assert [r["ids"] for r in answer["results"]] == ids.tolist()
    info = server.call("GET", "/info")[1]
    assert info["rerank"] == "sq8" and info["limits"]["max_rerank_candidates"] == 200


@pytest.mark.parametrize(
    ("rerank", "k", "status", "message"),
    [
        (-1, 10, 400, "rerank factor: expected a number between 0 and 100"),
        (1000, 10, 400, "rerank factor: expected a number between 0 and 100"),
        (50, 10, 400, "rerank times k at most 200 candidates per query"),
        ("4", 10, 422, "invalid request"),
        (True, 10, 422, "invalid request"),
        ([4], 10, 422, "invalid request"),
    ],
)
def test_nonsense_rerank_factors_get_a_clear_4xx(
    server: Server, rerank: object, k: int, status: int, message: str
) -> None:
    got, answer = server.call("POST", "/search", {"queries": [{"id": 1}], "k": k, "rerank": rerank})
    assert got == status and message in answer["error"]["message"], answer


def test_a_nan_rerank_factor_is_a_400(server: Server) -> None:
    status, answer = server.call("POST", "/search", raw=b'{"queries": [{"id": 1}], "rerank": NaN}')
    assert status == 400 and "rerank factor" in answer["error"]["message"], answer


def test_rerank_on_an_index_without_vectors_names_the_export_flag(indexes: tuple[Path, Path]) -> None:
    server = Server(indexes[1], None)
    try:
        assert server.call("POST", "/search", {"queries": [{"id": 1}], "rerank": 1})[0] == 200
        status, answer = server.call("POST", "/search", {"queries": [{"id": 1}], "rerank": 4})
        assert status == 400 and "--rerank sq8" in answer["error"]["fix"], answer
        assert server.call("GET", "/info")[1]["rerank"] is None
    finally:
        server.stop()
