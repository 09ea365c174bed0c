"""``poeem.Searcher``: load an index directory once, then search it, add and remove items.

Made for a long-running server: loading verifies checksums, searching is read-only and
batched, and updates are written atomically as a new version of the directory.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from poeem.errors import PoeemError
from poeem.export.faiss_export import build_faiss_index, check_list_rule
from poeem.export.learned import ItemsOrCodes, check_ids, learned_index
from poeem.index import PoeemLayer
from poeem.index.quantize import encode_rotated
from poeem.model.towers import Tower
from poeem.search.adc import IndexTensors, TorchIVFPQ
from poeem.search.faiss_backend import FaissSearcher
from poeem.search.index_dir import Manifest, read_manifest, read_safetensors, tensors_from_dict, write_version
from poeem.search.metric import Metric, prepare_queries

Backend = Literal["faiss", "torch"]


class Searcher:
    """Search a saved learned index by query embeddings or, with a saved query tower, by query ids.

    Use :meth:`create` to write a directory from a trained layer and :meth:`load` to open one.
    ``backend="faiss"`` searches the exported FAISS index; ``backend="torch"`` runs poeem's own
    ADC (same results; usable on GPU through ``device``).
    """

    def __init__(
        self,
        directory: Path,
        manifest: Manifest,
        tensors: IndexTensors,
        backend: Backend = "faiss",
        device: str = "cpu",
        query_tower: Tower | None = None,
    ) -> None:
        if backend not in ("faiss", "torch"):
            raise PoeemError("backend", "'faiss' or 'torch'", repr(backend), "pick one of those")
        self.directory, self.manifest, self.tensors = directory, manifest, tensors
        self.backend, self.device, self.query_tower = backend, device, query_tower
        self._build_engine()

    # ----------------------------------------------------------- create / load
    @classmethod
    def create(
        cls,
        directory: str | Path,
        layer: PoeemLayer,
        items: ItemsOrCodes,
        ids: torch.Tensor | np.ndarray | None = None,
        metric: Metric = "ip",
        fast_scan: bool = False,
        query_tower: Tower | None = None,
        query_tower_args: dict[str, Any] | None = None,
    ) -> Searcher:
        """Export a trained layer and its items into a new index directory (no training).

        Args:
            directory: where to write; an existing index there is an error.
            layer: the trained :class:`PoeemLayer`.
            items: (n, dim) item embeddings, or ``layer.encode()``'s (coarse_codes, codes).
            ids: (n,) int64 item ids, 0..n-1 by default.
            metric: "ip", "cosine" or "l2", as the model was trained.
            fast_scan: 4-bit fast-scan FAISS index (K = 16).
            query_tower, query_tower_args: a query tower and the arguments that rebuild it
                (``num_ids``, ``dim``, ``num_numeric``, ``hidden``, ``normalize``).
        """
        directory = Path(directory)
        if (directory / "manifest.json").exists():
            raise PoeemError(
                "index directory",
                "a new or empty folder",
                f"'{directory}' holds an index",
                "pass another --out, or use 'poeem add'/'poeem remove' to update it",
            )
        check_list_rule(layer, metric)
        tensors = learned_index(layer, items, ids)
        manifest = Manifest(
            metric=metric,
            dim=layer.config.dim,
            layer=layer.config.to_dict(),
            fast_scan=fast_scan,
            query_tower=query_tower_args,
        )
        extra = (
            {"query_tower": {k: v.detach().cpu().contiguous() for k, v in query_tower.state_dict().items()}}
            if query_tower is not None
            else None
        )
        index = build_faiss_index(tensors, metric, fast_scan)
        write_version(directory, manifest, index, tensors, extra)
        return cls.load(directory)

    @classmethod
    def load(cls, directory: str | Path, backend: Backend = "faiss", device: str = "cpu") -> Searcher:
        """Open an index directory, verifying its checksums."""
        directory = Path(directory)
        manifest = read_manifest(directory)
        tensors = tensors_from_dict(read_safetensors(directory / manifest.files["codes"]))
        tower = None
        if manifest.query_tower is not None and "query_tower" in manifest.files:
            args = dict(manifest.query_tower)
            args.pop("normalize", None)
            tower = Tower(
                args["num_ids"], args["dim"], args.get("num_numeric", 0), tuple(args.get("hidden", ()))
            )
            tower.load_state_dict(read_safetensors(directory / manifest.files["query_tower"]))
            tower.eval()
        return cls(directory, manifest, tensors, backend, device, tower)

    def _build_engine(self) -> None:
        import faiss

        if self.backend == "faiss":
            index = faiss.read_index(str(self.directory / self.manifest.files["faiss"]))
            self._engine: Any = FaissSearcher(index)
        else:
            t = self.tensors
            moved = IndexTensors(
                *(
                    x.to(self.device) if x is not None else None
                    for x in (t.rotation, t.coarse, t.codebooks, t.coarse_codes, t.codes, t.ids)
                )
            )
            self._engine = TorchIVFPQ(moved, self.metric)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ search
    @property
    def metric(self) -> str:
        """The index metric: "ip", "cosine" or "l2"."""
        return self.manifest.metric

    @property
    def ntotal(self) -> int:
        """Number of items in the index."""
        return self.tensors.ntotal

    @property
    def nlist(self) -> int:
        """Number of IVF lists (1 without a coarse quantizer)."""
        return self.tensors.nlist

    def search(
        self, xq: torch.Tensor | np.ndarray, k: int = 10, nprobe: int = 1, batch_size: int = 4096
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k items of each query embedding.

        Args:
            xq: (nq, dim) float query embeddings.
            k: results per query; more than the index holds is clamped, with a warning.
            nprobe: IVF lists probed; more than there are is clamped, with a warning.

        Returns:
            D: (nq, k) float32 scores (similarity for ip/cosine, squared distance for l2);
            I: (nq, k) int64 item ids, -1 where fewer than k were found.
        """
        xq = prepare_queries(xq, "ip", self.manifest.dim)
        if k < 1 or nprobe < 1:
            raise PoeemError(
                "search", "k >= 1 and nprobe >= 1", f"k={k}, nprobe={nprobe}", "pass positive values"
            )
        if k > self.ntotal:
            warnings.warn(
                f"k={k} is larger than the {self.ntotal} items in the index; using k={self.ntotal}",
                stacklevel=2,
            )
            k = max(1, self.ntotal)
        if nprobe > self.nlist:
            warnings.warn(
                f"nprobe={nprobe} is larger than the {self.nlist} lists; using nprobe={self.nlist}",
                stacklevel=2,
            )
            nprobe = self.nlist
        d_parts, i_parts = [], []
        for start in range(0, xq.shape[0], batch_size):
            d, i = self._engine.search(xq[start : start + batch_size], k, nprobe)
            d_parts.append(d.cpu().numpy())
            i_parts.append(i.cpu().numpy())
        if not d_parts:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        return np.concatenate(d_parts), np.concatenate(i_parts)

    def embed_queries(self, query_ids: np.ndarray, features: np.ndarray | None = None) -> torch.Tensor:
        """(nq,) query ids (+ (nq, F) features) -> (nq, dim) embeddings through the saved tower."""
        if self.query_tower is None:
            raise PoeemError(
                "query ids",
                "an index exported with its query tower",
                "an index without one",
                "search with query embeddings (.npy), or export from a training run",
            )
        ids = torch.as_tensor(np.asarray(query_ids), dtype=torch.long)
        num_ids = self.query_tower.embedding.num_embeddings
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_ids):
            raise PoeemError(
                "query ids",
                f"ids in [0, {num_ids})",
                f"range [{int(ids.min())}, {int(ids.max())}]",
                "pass ids of queries the model was trained on",
            )
        feats = torch.as_tensor(features, dtype=torch.float32) if features is not None else None
        with torch.no_grad():
            q = self.query_tower(ids, feats)
        return F.normalize(q, dim=-1) if (self.manifest.query_tower or {}).get("normalize") else q

    # ----------------------------------------------------------------- updates
    def add(self, items: torch.Tensor | np.ndarray, ids: torch.Tensor | np.ndarray) -> None:
        """Add items, coded with the frozen codebooks (no retraining), and save atomically.

        Args:
            items: (n, dim) item embeddings, as the item tower produces them (before the layer).
            ids: (n,) int64 ids, none already in the index.
        """
        x = prepare_queries(items, "ip", self.manifest.dim)
        if not bool(torch.isfinite(x).all()):
            raise PoeemError("items to add", "finite values", "NaN or inf", "check the embeddings")
        new_ids = check_ids(ids, x.shape[0])
        taken = torch.isin(new_ids, self.tensors.ids)
        if taken.any():
            raise PoeemError(
                "ids to add",
                "ids not already in the index",
                f"{int(taken.sum())} existing ids, e.g. {new_ids[taken][:5].tolist()}",
                "remove them first, or use new ids",
            )
        t = self.tensors
        cc, codes = encode_rotated(
            x @ t.rotation, t.coarse, t.codebooks, self.manifest.layer.get("coarse_metric", "l2")
        )
        cc = cc if cc is not None else torch.zeros(x.shape[0], dtype=torch.long)
        self._commit(
            IndexTensors(
                t.rotation,
                t.coarse,
                t.codebooks,
                torch.cat([t.coarse_codes, cc]),
                torch.cat([t.codes, codes]),
                torch.cat([t.ids, new_ids]),
            )
        )

    def remove(self, ids: torch.Tensor | np.ndarray) -> int:
        """Remove items by id and save atomically; returns how many were removed.

        Unknown ids are a clear error (nothing is changed)."""
        drop = torch.as_tensor(np.asarray(ids), dtype=torch.long).flatten()
        unknown = drop[~torch.isin(drop, self.tensors.ids)]
        if unknown.numel():
            raise PoeemError(
                "ids to remove",
                "ids present in the index",
                f"unknown ids {unknown[:5].tolist()}",
                "check the ids (nothing was removed)",
            )
        t = self.tensors
        keep = ~torch.isin(t.ids, drop)
        self._commit(
            IndexTensors(t.rotation, t.coarse, t.codebooks, t.coarse_codes[keep], t.codes[keep], t.ids[keep])
        )
        return int((~keep).sum())

    def _commit(self, tensors: IndexTensors) -> None:
        index = build_faiss_index(tensors, self.metric, self.manifest.fast_scan)  # type: ignore[arg-type]
        self.manifest = write_version(self.directory, self.manifest, index, tensors)
        self.tensors = tensors
        self._build_engine()
