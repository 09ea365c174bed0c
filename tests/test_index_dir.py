"""The index directory under several writers and readers, and with damaged files.
Each test is a regression (lost updates, raw tracebacks, unreadable files)."""

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DIM, make_dir, tiny_run, trained_layer

import poeem.search.reader as reader_module
from poeem import PoeemError, Searcher
from poeem.export import to_faiss
from poeem.export.index_dir import StaleIndexError, read_manifest
from poeem.pipeline import load_run


def test_a_stale_writer_is_refused_instead_of_dropping_items(tmp_path: Path) -> None:
    make_dir(tmp_path)
    first, second = Searcher.load(tmp_path / "ix"), Searcher.load(tmp_path / "ix")
    first.add(torch.randn(3, DIM), np.array([90_001, 90_002, 90_003]))
    with pytest.raises(StaleIndexError, match=r"version 2 on disk \(another writer updated it\)"):
        second.add(torch.randn(2, DIM), np.array([80_001, 80_002]))
    fresh = Searcher.load(tmp_path / "ix")  # reload, then the update goes through
    fresh.add(torch.randn(2, DIM), np.array([80_001, 80_002]))
    final = Searcher.load(tmp_path / "ix")
    assert final.ntotal == 1005 and final.version == 3
    assert {90_001, 80_002} <= set(final.tensors.ids.tolist())


def test_a_reader_that_read_an_old_manifest_reloads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_dir(tmp_path)
    old_manifest = read_manifest(tmp_path / "ix")
    writer = Searcher.load(tmp_path / "ix")
    writer.add(torch.randn(1, DIM), np.array([70_000]))
    writer.compact()  # version 3: a new base
    assert (tmp_path / "ix" / old_manifest.files["codes"]).exists()  # v1 kept for readers
    writer.add(torch.randn(1, DIM), np.array([70_001]))
    writer.compact()  # version 5: now v1's files are gone
    assert not (tmp_path / "ix" / old_manifest.files["codes"]).exists()
    real, calls = reader_module.read_manifest, []

    def racing(directory: Path, verify: bool = True) -> object:  # a load that read v1 just before
        calls.append(1)
        return old_manifest if len(calls) <= 2 else real(directory, verify)

    monkeypatch.setattr(reader_module, "read_manifest", racing)
    loaded = Searcher.load(tmp_path / "ix")
    assert len(calls) > 2 and loaded.version == 5 and loaded.ntotal == 1002


def test_files_are_readable_by_other_users(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        make_dir(tmp_path)
    finally:
        os.umask(old)
    for path in (tmp_path / "ix").iterdir():
        if path.name != ".lock":
            assert stat.S_IMODE(path.stat().st_mode) == 0o644, path.name  # was 0600


def corrupt_manifest(tmp_path: Path, change: dict) -> None:
    path = tmp_path / "ix" / "manifest.json"
    manifest = json.loads(path.read_text())
    for key, value in change.items():
        if value is None:
            manifest.pop(key, None)
        else:
            manifest[key] = value
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"files": {"faiss": "index-1.faiss"}}, r"field 'files': expected an entry for 'codes'"),
        ({"sha256": "abc"}, r"field 'sha256': expected an object of file name -> 64 hex digits"),
        ({"sha256": {"index-1.faiss": "zz"}}, r"field 'sha256': expected an object of file name -> 64 hex"),
        ({"metric": "hamming"}, r"field 'metric': expected 'ip', 'cosine' or 'l2', got 'hamming'"),
        ({"metric": None}, r"field 'metric': expected a value, got 'missing'"),
        ({"layer": {"dim": 16, "codebook_size": 3}}, r"codebook_size: expected K a power of two"),
        ({"version": -1}, r"field 'version': expected a non-negative integer"),
        ({"files": {"faiss": "../x", "codes": "c"}}, r"plain file names inside the directory"),
    ],
)
def test_malformed_manifests_are_clear_errors(tmp_path: Path, change: dict, message: str) -> None:
    make_dir(tmp_path)
    corrupt_manifest(tmp_path, change)
    with pytest.raises(PoeemError, match=message):
        Searcher.load(tmp_path / "ix")


def test_truncated_json_manifest(tmp_path: Path) -> None:
    make_dir(tmp_path)
    path = tmp_path / "ix" / "manifest.json"
    path.write_text(path.read_text()[:40])
    with pytest.raises(PoeemError, match="index manifest: expected valid JSON"):
        Searcher.load(tmp_path / "ix")


def test_out_of_range_codes_are_refused_at_export() -> None:
    layer, x = trained_layer("none", 8)
    coarse_codes, codes = layer.encode(x[:10])
    with pytest.raises(PoeemError, match=r"coarse codes: expected values in \[0, nlist=8\), got range"):
        to_faiss(layer, (coarse_codes.long() + 8, codes))
    negative = codes.long().clone()
    negative[0, 0] = -1
    with pytest.raises(PoeemError, match=r"sub-codes: expected values in \[0, K=16\), got range \[-1"):
        to_faiss(layer, (coarse_codes, negative))


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        (np.arange(10) - 1, r"item ids: expected non-negative ids, got 1 negative ids, e\.g\. -1"),
        (np.arange(10) + 0.5, r"item ids: expected 64-bit integer ids, got dtype float64, e\.g\. 0\.5"),
        (np.arange(10, dtype=float), r"expected 64-bit integer ids, got dtype float64"),
    ],
)
def test_negative_and_float_ids_are_refused(ids: np.ndarray, message: str) -> None:
    layer, x = trained_layer("none", 8)
    with pytest.raises(PoeemError, match=message):
        to_faiss(layer, x[:10], ids)


def test_negative_and_float_ids_are_refused_on_add_and_remove(tmp_path: Path) -> None:
    searcher, _, _ = make_dir(tmp_path)
    with pytest.raises(PoeemError, match="ids to add: expected non-negative ids"):
        searcher.add(torch.randn(1, DIM), np.array([-5]))
    with pytest.raises(PoeemError, match="ids to add: expected 64-bit integer ids, got dtype float64"):
        searcher.add(torch.randn(1, DIM), np.array([7.9]))
    with pytest.raises(PoeemError, match="ids to remove: expected 64-bit integer ids"):
        searcher.remove(np.array([10.0]))
    assert Searcher.load(tmp_path / "ix").ntotal == 1000  # nothing was written


@pytest.mark.parametrize("backend", ["faiss", "torch"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_queries_are_refused(tmp_path: Path, backend: str, bad: float) -> None:
    searcher, _, _ = make_dir(tmp_path, backend)
    xq = torch.randn(3, DIM)
    xq[1, 2] = bad
    with pytest.raises(
        PoeemError, match=r"queries: expected finite values, got NaN or inf in 1 rows, e\.g\. row 1"
    ):
        searcher.search(xq, 5)


def test_truncated_run_files_are_clear_errors(tmp_path: Path) -> None:
    run = tiny_run(tmp_path)
    weights = run / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(PoeemError, match="run weights: expected a readable safetensors file"):
        load_run(run)
    config = run / "config.json"
    config.write_text(config.read_text()[:50])
    with pytest.raises(PoeemError, match="run config: expected valid JSON"):
        load_run(run)


def test_id_maps_extend_without_truncating_or_confusing_an_empty_map() -> None:
    from poeem.ids import IdMap

    numbers = IdMap(np.array([10, 20]))
    with pytest.raises(PoeemError, match="expected 64-bit integer ids, got dtype float64"):
        numbers.extend(np.array([30.7]), 1)  # was truncated to 30
    grown, rows = numbers.extend(np.array([20, 30]), 2)
    assert grown.is_integer and rows.tolist() == [1, 2] and grown.keys.tolist() == [10, 20, 30]
    empty = IdMap(np.array([], dtype=str))
    grown, rows = empty.extend(np.array(["a-long-new-id"]), 1)
    assert grown.keys.tolist() == ["a-long-new-id"] and rows.tolist() == [0]


def test_a_file_that_vanishes_mid_read_reloads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: only MissingIndexFile was retried; a file deleted by a writer between the
    manifest check and its read (here: inside the tensor read) failed the load."""
    make_dir(tmp_path)
    real_read = reader_module.read_tensors
    writes = iter([True])

    def read_while_a_writer_publishes(path: Path, *args: object) -> dict[str, torch.Tensor]:
        if next(writes, False):  # two compactions: version 1's files are deleted
            writer = Searcher.load(tmp_path / "ix")
            writer.add(torch.randn(1, DIM), np.array([60_000]))
            writer.compact()
            writer.add(torch.randn(1, DIM), np.array([60_001]))
            writer.compact()
            assert not Path(path).exists()
        return real_read(path, *args)

    monkeypatch.setattr(reader_module, "read_tensors", read_while_a_writer_publishes)
    loaded = Searcher.load(tmp_path / "ix")
    assert loaded.version == 5 and loaded.ntotal == 1002


def test_empty_string_ids_are_refused(tmp_path: Path) -> None:
    """Regression: an item with id "" was accepted and never returned ("" means no result)."""
    layer, x = trained_layer("none", 8)
    with pytest.raises(PoeemError, match="ids: expected non-empty string ids, got 1 empty ids"):
        Searcher.create(tmp_path / "ix", layer, x[:3], ids=np.array(["a", "", "c"]))
    from poeem.ids import IdMap

    with pytest.raises(PoeemError, match="non-empty string ids"):
        IdMap(np.array(["a", "b"])).extend(["c", ""], 2)


def test_queries_whose_scores_overflow_are_refused(tmp_path: Path) -> None:
    layer, x = trained_layer("none", 8)
    Searcher.create(tmp_path / "ip", layer, x, metric="ip")
    for backend in ("faiss", "torch"):
        searcher = Searcher.load(tmp_path / "ip", backend=backend)
        with pytest.raises(PoeemError, match="vectors whose scores fit in float32"):
            searcher.search(np.full((1, DIM), 3e38, np.float32), 3)
        assert (searcher.search(np.full((1, DIM), 1e30, np.float32), 3)[1] >= 0).all()


def test_memory_mapped_tensors_read_back_exactly_and_leave_the_file_alone(tmp_path: Path) -> None:
    from poeem.storage import read_tensors, save_tensors

    saved = {
        "item": torch.randn(1000, 3),
        "query": torch.randn(5, 2).double(),
        "none": torch.zeros(0, 4),
        "ids": torch.arange(7),
    }
    save_tensors(tmp_path / "f.safetensors", saved)
    mapped = read_tensors(tmp_path / "f.safetensors", "features", "fix", mmap=True)
    for name, tensor in saved.items():
        assert torch.equal(mapped[name], tensor) and mapped[name].dtype == tensor.dtype, name
    mapped["item"][0, 0] = 5.0  # copy-on-write: the process's copy changes, the file does not
    assert torch.equal(read_tensors(tmp_path / "f.safetensors", "features", "fix")["item"], saved["item"])
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(PoeemError, match="features"):
        read_tensors(tmp_path / "bad.safetensors", "features", "fix", mmap=True)
