"""Files written by an earlier version still load: a run folder, its index directory and the
FAISS file inside it, committed in tests/data/saved_run (see its README)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import faiss
import numpy as np
import torch

from poeem.pipeline import export_run, load_run
from poeem.search import Searcher

SAVED = Path(__file__).parent / "data" / "saved_run"


def expected() -> dict:
    return json.loads((SAVED / "expected.json").read_text())


def search(index_dir: Path) -> tuple[np.ndarray, list[list[str]]]:
    want = expected()
    searcher = Searcher.load(index_dir)
    scores, ids = searcher.search(
        searcher.embed_queries(np.array(want["queries"])), want["k"], nprobe=want["nprobe"]
    )
    return np.asarray(scores), [[str(i) for i in row] for row in ids]


def test_a_saved_index_directory_searches_as_it_did(tmp_path: Path) -> None:
    shutil.copytree(SAVED / "index", tmp_path / "index")
    scores, ids = search(tmp_path / "index")
    assert ids == expected()["ids"]
    np.testing.assert_allclose(scores, expected()["scores"], rtol=1e-5, atol=1e-6)
    inner = faiss.downcast_index(faiss.read_index(str(tmp_path / "index" / "index-1.faiss")))
    assert inner.ntotal == len(json.loads((SAVED / "index" / "item_keys-1.json").read_text()))


def test_a_saved_run_loads_and_exports_the_same_index(tmp_path: Path) -> None:
    shutil.copytree(SAVED / "run", tmp_path / "run")
    cfg, model = load_run(tmp_path / "run")
    assert cfg.model.poeem is not None and model.index is not None
    assert all(torch.isfinite(p).all() for p in model.parameters())
    export_run(tmp_path / "run", tmp_path / "index", fast_scan=False)
    scores, ids = search(tmp_path / "index")
    assert ids == expected()["ids"]
    np.testing.assert_allclose(scores, expected()["scores"], rtol=1e-5, atol=1e-6)
