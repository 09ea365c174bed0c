"""A BEIR-format text retrieval dataset: ``corpus.jsonl``, ``queries.jsonl``, ``qrels/{split}.tsv``.

Errors name the file and the line. Ids are kept as the strings the files hold.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from poeem.data.files import DATA_PATH_FIX
from poeem.data.interactions import CSR, InteractionData
from poeem.errors import PoeemError
from poeem.ids import IdMap
from poeem.user_files import malformed, require_file

Qrels = dict[str, dict[str, int]]  # query id -> {document id: relevance}


@dataclass
class BeirData:
    """Documents, queries and relevance judgements by split.

    Attributes:
        doc_ids, doc_texts: the corpus, in file order; a document's text is its title and body
            joined by a space (the BEIR convention for sentence encoders).
        query_ids, query_texts: the queries, in file order.
        qrels: ``{split: {query id: {document id: relevance}}}`` for each split read.
    """

    doc_ids: list[str]
    doc_texts: list[str]
    query_ids: list[str]
    query_texts: list[str]
    qrels: dict[str, Qrels]

    def query_rows(self, split: str) -> list[int]:
        """Row numbers (into ``query_ids``) of the queries judged in ``split``, in file order."""
        judged = self.qrels[split]
        return [row for row, qid in enumerate(self.query_ids) if qid in judged]

    def pairs(self, split: str) -> tuple[list[int], list[int]]:
        """(query row, document row) of every positive judgement of ``split``."""
        doc_row = {d: i for i, d in enumerate(self.doc_ids)}
        queries, docs = [], []
        for row in self.query_rows(split):
            for doc, relevance in self.qrels[split][self.query_ids[row]].items():
                if relevance > 0:
                    queries.append(row)
                    docs.append(doc_row[doc])
        return queries, docs

    def summary(self) -> str:
        """One line: corpus, queries and judgements per split."""
        splits = ", ".join(f"{s}: {len(q)} queries" for s, q in self.qrels.items())
        return f"{len(self.doc_ids):,} documents, {len(self.query_ids):,} queries ({splits})"


def _read_jsonl(path: Path, fields: tuple[str, ...], required: tuple[str, ...]) -> list[dict[str, str]]:
    """Records of a JSON-lines file: ``fields`` must be strings where present, ``required`` present."""
    rows = []
    with path.open(encoding="utf-8") as f:
        for no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise malformed(path, no, "one JSON object per line", line) from None
            if not isinstance(row, dict) or any(not isinstance(row.get(k, ""), str) for k in fields):
                raise malformed(path, no, f"a JSON object with string fields {fields}", line)
            if not row.get("_id"):
                raise malformed(path, no, "a non-empty '_id'", line)
            missing = [k for k in required if k not in row]
            if missing:
                raise malformed(path, no, f"the field(s) {missing}", line)
            rows.append(row)
    if not rows:
        raise PoeemError(str(path), "at least one record", "an empty file", "check the dataset folder")
    return rows


def read_documents(path: Path) -> tuple[list[str], list[str]]:
    """The documents of a BEIR-style corpus file, one ``{"_id", "title", "text"}`` object per line.

    Returns:
        (n,) unique ids and (n,) texts, each its title and text joined by a space (as trained).
    """
    rows = _read_jsonl(path, ("_id", "title", "text"), ("_id",))
    ids = [str(r["_id"]) for r in rows]
    _unique(ids, path)
    return ids, [f"{r.get('title', '')} {r.get('text', '')}".strip() for r in rows]


def _unique(ids: list[str], path: Path) -> None:
    seen: set[str] = set()
    for no, i in enumerate(ids, 1):
        if i in seen:
            raise PoeemError(
                f"{path}, record {no}", "unique '_id' values", f"'{i}' again", "remove duplicates"
            )
        seen.add(i)


def _read_qrels(path: Path, queries: set[str], docs: set[str]) -> Qrels:
    qrels: Qrels = {}
    expected = "query-id<TAB>corpus-id<TAB>score (an integer), after a header line"
    with path.open(encoding="utf-8") as f:
        for no, line in enumerate(f, 1):
            parts = line.rstrip("\r\n").split("\t")
            if (no == 1 and parts[0] == "query-id") or not line.strip():
                continue
            if len(parts) != 3 or not parts[2].lstrip("-").isdigit():
                raise malformed(path, no, expected, line)
            query, doc, score = parts[0], parts[1], int(parts[2])
            if query not in queries:
                raise malformed(path, no, "a query id that queries.jsonl holds", line)
            if doc not in docs:
                raise malformed(path, no, "a corpus id that corpus.jsonl holds", line)
            qrels.setdefault(query, {})[doc] = score
    return qrels


def load_beir(path: str | Path, splits: tuple[str, ...] = ("train", "test")) -> BeirData:
    """Read a BEIR dataset folder.

    Args:
        path: folder with ``corpus.jsonl``, ``queries.jsonl`` and ``qrels/<split>.tsv``.
        splits: the judgement files to read.

    Returns:
        :class:`BeirData`.
    """
    root = Path(path)
    if not root.is_dir():
        raise PoeemError("BEIR dataset", "a folder", f"'{root}'", "pass the folder that holds corpus.jsonl")
    corpus_path = require_file(root / "corpus.jsonl", "BEIR corpus", DATA_PATH_FIX)
    queries_path = require_file(root / "queries.jsonl", "BEIR queries", DATA_PATH_FIX)
    doc_ids, doc_texts = read_documents(corpus_path)
    queries = _read_jsonl(queries_path, ("_id", "text"), ("_id", "text"))
    query_ids = [str(r["_id"]) for r in queries]
    _unique(query_ids, queries_path)
    qrels = {
        split: _read_qrels(
            require_file(root / "qrels" / f"{split}.tsv", f"BEIR {split} qrels", DATA_PATH_FIX),
            set(query_ids),
            set(doc_ids),
        )
        for split in splits
    }
    return BeirData(doc_ids, doc_texts, query_ids, [r["text"] for r in queries], qrels)


def beir_task(path: str | Path, train_split: str = "train", test_split: str = "test") -> InteractionData:
    """A BEIR dataset as an :class:`InteractionData`: positive ``train_split`` judgements are the
    training pairs, ``test_split`` judgements the held-out truth; ids and texts are kept.

    Args:
        path: the BEIR folder.
        train_split, test_split: the qrels files to use.
    """
    data = load_beir(path, (train_split, test_split))
    train_q, train_d = data.pairs(train_split)
    test_q, test_d = data.pairs(test_split)
    if not train_q:
        raise PoeemError(f"{path} {train_split} qrels", "positive judgements", "none", "check the qrels file")
    nq, nd = len(data.query_ids), len(data.doc_ids)
    return InteractionData(
        name=f"beir:{Path(path).name}",
        train_queries=np.asarray(train_q, dtype=np.int64),
        train_items=np.asarray(train_d, dtype=np.int64),
        num_queries=nq,
        num_items=nd,
        test=CSR.from_pairs(np.asarray(test_q, dtype=np.int64), np.asarray(test_d, dtype=np.int64), nq),
        exclude_train=False,  # a document judged for a training query may be relevant to a test query
        query_keys=IdMap(np.asarray(data.query_ids)),
        item_keys=IdMap(np.asarray(data.doc_ids)),
        query_texts=data.query_texts,
        item_texts=data.doc_texts,
    )
