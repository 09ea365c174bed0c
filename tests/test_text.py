"""Text towers on a tiny sentence-transformers model built here (no download, no ../shared):
the BEIR loader, the model, training with the layer, export, search by text, and serving."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TOKEN, Server, cli

pytest.importorskip("sentence_transformers")

from typer.testing import CliRunner

from poeem import PoeemError, Searcher
from poeem.cli import app
from poeem.data import beir_task, load_beir
from poeem.model import ModelConfig
from poeem.model.text import TextSideEncoder, TextTwoTowerModel, embed_texts, load_encoder
from poeem.pipeline import load_run

WORDS = [f"w{i}" for i in range(40)]


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-layer BERT with mean pooling and normalisation, saved as a sentence-transformers folder."""
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel, BertTokenizerFast

    root = tmp_path_factory.mktemp("encoder")
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]))
    torch.manual_seed(0)
    bert = BertModel(
        BertConfig(
            vocab_size=len(WORDS) + 5,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=64,
        )
    )
    bert.save_pretrained(root / "bert")
    BertTokenizerFast(str(root / "vocab.txt")).save_pretrained(
        root / "bert"
    )  # the vocabulary file, positionally
    transformer = models.Transformer(str(root / "bert"), max_seq_length=32)
    st = SentenceTransformer(modules=[transformer, models.Pooling(16, "mean"), models.Normalize()])
    st.save(str(root / "st"))
    return root / "st"


def write_beir(root: Path, seed: int = 0) -> Path:
    """60 documents, 40 queries; a query shares two words with each of its relevant documents."""
    rng = random.Random(seed)
    docs = [" ".join(rng.sample(WORDS, 6)) for _ in range(60)]
    root.mkdir(parents=True, exist_ok=True)
    (root / "qrels").mkdir(exist_ok=True)
    with (root / "corpus.jsonl").open("w") as f:
        for i, text in enumerate(docs):
            f.write(json.dumps({"_id": f"d{i}", "title": "", "text": text}) + "\n")
    qrels = {"train": ["query-id\tcorpus-id\tscore"], "test": ["query-id\tcorpus-id\tscore"]}
    with (root / "queries.jsonl").open("w") as f:
        for q in range(40):
            doc = rng.randrange(60)
            f.write(json.dumps({"_id": f"q{q}", "text": " ".join(docs[doc].split()[:2])}) + "\n")
            qrels["train" if q < 30 else "test"].append(f"q{q}\td{doc}\t1")
    for split, lines in qrels.items():
        (root / "qrels" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POEEM_CACHE", str(tmp_path / "cache"))


# ------------------------------------------------------------------------ data
def test_beir_loader_reads_ids_texts_and_judgements(tmp_path: Path) -> None:
    data = load_beir(write_beir(tmp_path / "beir"))
    assert len(data.doc_ids) == 60 and len(data.query_ids) == 40
    assert len(data.qrels["train"]) == 30 and len(data.qrels["test"]) == 10
    task = beir_task(tmp_path / "beir")
    assert (
        task.num_train == 30 and task.item_keys.keys[0] == "d0" and task.query_texts[0] == data.query_texts[0]
    )


@pytest.mark.parametrize(
    "file, line, needle",
    [
        ("corpus.jsonl", "{not json\n", "corpus.jsonl, line 61"),
        ("qrels/test.tsv", "q1\tnope\t1\n", "a corpus id that corpus.jsonl holds"),
        ("qrels/train.tsv", "q1\td1\n", "query-id<TAB>corpus-id<TAB>score"),
    ],
)
def test_beir_errors_name_the_file_and_line(tmp_path: Path, file: str, line: str, needle: str) -> None:
    root = write_beir(tmp_path / "beir")
    with (root / file).open("a") as f:
        f.write(line)
    with pytest.raises(PoeemError, match=needle.replace("<", ".").replace(">", ".")):
        load_beir(root)


def test_a_query_without_text_names_its_line(tmp_path: Path) -> None:
    root = write_beir(tmp_path / "beir")
    with (root / "queries.jsonl").open("a") as f:
        f.write(json.dumps({"_id": "q99"}) + "\n")
    with pytest.raises(PoeemError, match=r"queries.jsonl, line 41: expected the field\(s\) \['text'\]"):
        load_beir(root)


def test_missing_qrels_is_a_clear_error(tmp_path: Path) -> None:
    root = write_beir(tmp_path / "beir")
    (root / "qrels" / "test.tsv").unlink()
    with pytest.raises(PoeemError, match="BEIR test qrels"):
        load_beir(root)


# ----------------------------------------------------------------------- model
def test_untrained_text_model_scores_like_the_encoder(tmp_path: Path, tiny_encoder: Path) -> None:
    data = beir_task(write_beir(tmp_path / "beir"))
    config = ModelConfig(dim=16, text={"encoder": str(tiny_encoder)})
    model = TextTwoTowerModel(config, data.num_items)
    model.attach_texts(data.query_texts, data.item_texts, progress=False)
    encoder = load_encoder(str(tiny_encoder))
    expected = encoder.encode(data.item_texts, convert_to_tensor=True)
    torch.testing.assert_close(model.all_item_embeddings(), expected, atol=1e-5, rtol=1e-5)


def test_many_queries_are_encoded_in_batches_of_similar_length(tmp_path: Path, tiny_encoder: Path) -> None:
    data = beir_task(write_beir(tmp_path / "beir"))
    config = ModelConfig(dim=16, text={"encoder": str(tiny_encoder), "mode": "query", "batch_size": 8})
    model = TextTwoTowerModel(config, data.num_items)
    model.attach_texts(
        [f"w{i} " * (1 + i % 7) for i in range(len(data.query_texts))], data.item_texts, progress=False
    )
    model.eval()
    rows = torch.arange(len(data.query_texts) - 1, -1, -1)  # 40 texts of 1-7 words, 5 batches
    with torch.no_grad():
        together = model.encode_queries(rows)
        alone = torch.cat([model.encode_queries(rows[i : i + 1]) for i in range(len(rows))])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_frozen_embeddings_are_cached(tmp_path: Path, tiny_encoder: Path) -> None:
    encoder = load_encoder(str(tiny_encoder))
    first = embed_texts(encoder, ["w1 w2", "w3"], progress=False, cache_key="tiny")
    encoder.encode = None  # a second call must not encode again
    assert torch.equal(embed_texts(encoder, ["w1 w2", "w3"], progress=False, cache_key="tiny"), first)
    assert len(list((tmp_path / "cache" / "embeddings").glob("*.safetensors"))) == 1


def test_the_cache_keys_on_the_weights_and_on_unambiguous_texts(tmp_path: Path, tiny_encoder: Path) -> None:
    """Regressions: a retrained encoder in the same folder got the old embeddings back, and
    ["x\0y"] then ["x", "y"] returned one row for two texts."""
    from poeem.model.text import encoder_fingerprint

    encoder = load_encoder(str(tiny_encoder))
    key = encoder_fingerprint(encoder, 32)
    before = embed_texts(encoder, ["w1 w2"], progress=False, cache_key=key)
    with torch.no_grad():
        next(encoder.parameters()).add_(0.5)  # "retrained", same name and settings
    retrained_key = encoder_fingerprint(encoder, 32)
    assert retrained_key != key
    after = embed_texts(encoder, ["w1 w2"], progress=False, cache_key=retrained_key)
    assert not torch.allclose(before, after)
    joined = embed_texts(encoder, ["w1\0w2"], progress=False, cache_key=key)
    split = embed_texts(encoder, ["w1", "w2"], progress=False, cache_key=key)
    assert joined.shape[0] == 1 and split.shape[0] == 2
    lone = embed_texts(encoder, ["w1 \ud800"], progress=False, cache_key=key)  # no UnicodeEncodeError
    assert lone.shape[0] == 1


def test_a_missing_encoder_is_a_clear_error() -> None:
    with pytest.raises(PoeemError, match="nothing is downloaded"):
        load_encoder("no-such-model-anywhere")


# ------------------------------------------------------------------ end to end
def train_args(beir: Path, encoder: Path, mode: str, run_dir: Path) -> list[str]:
    args = ["train", "--data", "beir", "--data-path", str(beir), "--text-encoder", str(encoder)]
    args += ["--text-mode", mode, "--poeem", "--num-coarse", "0", "--num-subspaces", "4"]
    args += ["--codebook-size", "16", "--warmup-steps", "4", "--buffer-size", "64", "--batch-size", "8"]
    args += ["--random-negatives", "8", "--epochs", "6", "--lr", "0.01", "--k", "10"]
    return [*args, "--no-progress", "--logger", "none", "--run-dir", str(run_dir)]


def train(tmp_path: Path, encoder: Path, mode: str) -> tuple[Path, Path]:
    beir = write_beir(tmp_path / "beir")
    run_dir, index = tmp_path / f"run-{mode}", tmp_path / f"index-{mode}"
    result = CliRunner().invoke(app, train_args(beir, encoder, mode, run_dir), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "poeem" in result.output
    # few labels: the towers train alone, then the index is fitted on every document and distilled
    assert "the towers trained alone" in result.output and "fitted on 60 items" in result.output
    assert "index distilled after training" in result.output
    result = CliRunner().invoke(app, ["export", str(run_dir), "--out", str(index)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return run_dir, index


@pytest.mark.parametrize("mode", ["frozen", "query", "both"])
def test_train_export_and_search_by_text(tmp_path: Path, tiny_encoder: Path, mode: str) -> None:
    run_dir, index = train(tmp_path, tiny_encoder, mode)
    cfg, model = load_run(run_dir)
    data = beir_task(cfg.data.path)
    model.attach_texts(data.query_texts, data.item_texts, progress=False)
    if mode != "frozen":  # the query encoder fine-tuned, and the index carries its weights
        tuned = model.encoder.state_dict()
        base = load_encoder(str(tiny_encoder)).state_dict()
        assert any(not torch.equal(tuned[k], base[k]) for k in tuned)
    searcher = Searcher.load(index)
    texts = ["w1 w2", data.query_texts[35]]
    own = model.encode_query_texts(texts)
    torch.testing.assert_close(searcher.embed_texts(texts), own, atol=1e-5, rtol=1e-5)
    # the index answers in the corpus' own ids, like the model's own quantized scores
    scores, ids = searcher.search(searcher.embed_texts(texts), k=5)
    assert len(set(scores[0].tolist())) > 1  # a discriminative model, not a tie of every document
    assert ids.dtype.kind == "U" and all(i.startswith("d") for i in ids.ravel())
    result = CliRunner().invoke(app, ["search", str(index), "--query", "w1 w2", "-k", "3"])
    assert result.exit_code == 0, result.output
    rows = [line.split(",") for line in result.output.splitlines() if line.startswith("0,")]
    assert [r[2] for r in rows] == list(ids[0, :3])
    result = CliRunner().invoke(app, ["evaluate", str(run_dir)])
    assert result.exit_code == 0 and "poeem" in result.output, result.output
    # documents are embedded by text exactly as the model's document tower does
    rows = torch.tensor([3, 17])
    with torch.no_grad():
        own_docs = model.encode_items(rows)
    torch.testing.assert_close(
        searcher.embed_item_texts([data.item_texts[3], data.item_texts[17]]), own_docs, atol=1e-5, rtol=1e-5
    )
    # a document added by text is coded like the trained ones: a copy of d3 under a new id
    # scores exactly like d3 for any query
    copy = {"_id": "new-doc", "title": "", "text": data.item_texts[3]}
    (tmp_path / "new.jsonl").write_text(json.dumps(copy) + "\n")
    result = CliRunner().invoke(app, ["add", str(index), "--texts", str(tmp_path / "new.jsonl")])
    assert result.exit_code == 0 and "61 items" in result.output, result.output
    reloaded = Searcher.load(index)
    scores, found = reloaded.search(reloaded.embed_texts(["w1 w2", data.item_texts[3]]), k=61)
    for row_scores, row_ids in zip(scores, found.tolist(), strict=True):
        assert row_scores[row_ids.index("new-doc")] == pytest.approx(
            row_scores[row_ids.index("d3")], abs=1e-5
        )


def test_a_text_run_under_torchrun_builds_its_index_as_one_process_does(
    tmp_path: Path, tiny_encoder: Path
) -> None:
    beir = write_beir(tmp_path / "beir")
    for name, torchrun in (("one", False), ("ranks", True)):
        done = cli(*train_args(beir, tiny_encoder, "frozen", tmp_path / name), torchrun=torchrun)
        assert (
            done.stdout.count("run folder:") == 1 and done.stdout.count("index distilled after training") == 1
        )
    one, ranks = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("one", "ranks"))
    assert one["fit"]["items"] == ranks["fit"]["items"] == 60  # rank 0 fits every document alone
    assert one["distill"]["epochs"] == ranks["distill"]["epochs"]
    served = [load_run(tmp_path / n)[1].index for n in ("one", "ranks")]
    assert all(layer.is_initialized for layer in served)
    assert served[0].config.to_dict() == served[1].config.to_dict()


def test_text_query_head_must_match_the_encoder(tmp_path: Path, tiny_encoder: Path) -> None:
    with pytest.raises(PoeemError, match="text query head"):
        TextSideEncoder.from_state({"encoder": str(tiny_encoder)}, {"head.weight": torch.zeros(4, 7)})


def test_search_by_text_needs_a_text_index(tmp_path: Path) -> None:
    from poeem import PoeemLayer

    layer = PoeemLayer(dim=8, num_subspaces=2, codebook_size=4, warmup_steps=0, buffer_size=16)
    layer.initialize(torch.randn(16, 8))
    searcher = Searcher.create(tmp_path / "ix", layer, torch.randn(16, 8))
    with pytest.raises(PoeemError, match="an index exported from a text model"):
        searcher.embed_texts(["hello"])
    with pytest.raises(PoeemError, match="--query-file or --query"):
        CliRunner().invoke(app, ["search", str(tmp_path / "ix")], catch_exceptions=False)


def test_serve_accepts_text_queries(tmp_path: Path, tiny_encoder: Path) -> None:
    _, index = train(tmp_path, tiny_encoder, "frozen")
    server = Server(index)
    try:
        doc = beir_task(tmp_path / "beir").item_texts[5]
        item = {"items": [{"id": "added-by-text", "text": doc}]}
        status, body = server.call("POST", "/items", item, token=TOKEN)
        assert status == 200 and body["items"] == 61, body
        status, body = server.call("POST", "/search", {"queries": [{"text": doc}], "k": 61})
        hits = dict(zip(body["results"][0]["ids"], body["results"][0]["scores"], strict=True))
        assert hits["added-by-text"] == pytest.approx(hits["d5"], abs=1e-5)  # coded like its twin
        both = {"items": [{"id": "x", "text": doc, "embedding": [0.1] * 16}]}
        assert server.call("POST", "/items", both, token=TOKEN)[0] == 422
        status, body = server.call("POST", "/search", {"queries": [{"text": "w1 w2"}], "k": 3})
        assert status == 200, body
        searcher = Searcher.load(index)
        _, ids = searcher.search(searcher.embed_texts(["w1 w2"]), k=3)
        assert body["results"][0]["ids"] == list(ids[0])
        assert np.isfinite(body["results"][0]["scores"]).all()
        assert server.call("POST", "/search", {"queries": [{"text": "w1", "id": "q1"}]})[0] == 422
        assert server.call("GET", "/info")[1]["text_queries"] is True
        assert server.call("GET", "/info")[1]["text_items"] is True
    finally:
        server.stop()


def test_a_relative_encoder_folder_is_recorded_absolute(
    tmp_path: Path, tiny_encoder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    beir = write_beir(tmp_path / "beir")
    monkeypatch.chdir(tiny_encoder.parent)
    args = ["train", "--data", "beir", "--data-path", str(beir), "--text-encoder", tiny_encoder.name]
    args += ["--epochs", "1", "--no-progress", "--logger", "none", "--run-dir", str(tmp_path / "run")]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert f"text towers: {tiny_encoder.name}, mode frozen, dim 16" in result.output
    stored = json.loads((tmp_path / "run" / "config.json").read_text())["model"]["text"]["encoder"]
    assert stored == str(tiny_encoder.resolve())
