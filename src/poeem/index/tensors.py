"""The learned IVF-PQ index as plain tensors, validated, and its safetensors form."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from poeem.errors import PoeemError


@dataclass
class IndexTensors:
    """Everything an IVF-PQ index holds, as CPU or device tensors (no FAISS objects).

    rotation: (dim, dim); the index codes x @ rotation.
    coarse: (coarse_K, dim) coarse centroids, or None (plain PQ).
    codebooks: (D, K, dsub) product-quantization codewords, or (D, K, dim) residual-quantizer ones.
    coarse_codes: (n,) list of each item (zeros without IVF), in ``code_dtype(nlist)``.
    codes: (n, D) sub-codes, in ``code_dtype(K)`` (1 byte each for K <= 256).
    ids: (n,) int64 non-negative ids of the items, as FAISS stores them.
    vectors: (n, dim) the items' own vectors kept to re-rank candidates (float32, float16 or
        uint8 rows of a :class:`poeem.export.item_vectors.VectorCodec`), or None. They travel
        with the rows (segments, removes, compaction) but are saved in their own file, not in
        :meth:`to_dict`.

    Codes of any integer dtype are accepted; :meth:`validate` checks their range and stores them
    compactly (int64 codes cost 8 bytes per sub-code: 3.2 GB for 50M items at D = 8). Index with
    ``.long()``: torch reads a uint8 index tensor as a mask.
    """

    rotation: torch.Tensor
    coarse: torch.Tensor | None
    codebooks: torch.Tensor
    coarse_codes: torch.Tensor
    codes: torch.Tensor
    ids: torch.Tensor
    vectors: torch.Tensor | None = None

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        return self.rotation.shape[0]

    @property
    def ntotal(self) -> int:
        """Number of items."""
        return self.codes.shape[0]

    @property
    def nlist(self) -> int:
        """Number of inverted lists (1 without IVF)."""
        return self.coarse.shape[0] if self.coarse is not None else 1

    def max_norm(self) -> float:
        """An upper bound of every reconstruction's L2 norm: the largest coarse centroid plus
        the largest codeword of each subspace or stage (the rotation keeps norms)."""
        words = self.codebooks.double().norm(dim=-1).amax(-1).sum()
        coarse = self.coarse.double().norm(dim=-1).max() if self.coarse is not None else 0.0
        return float(words + coarse)

    def to(self, device: torch.device | str) -> IndexTensors:
        """A copy with every tensor on ``device``."""
        moved = (
            self.rotation,
            self.coarse,
            self.codebooks,
            self.coarse_codes,
            self.codes,
            self.ids,
            self.vectors,
        )
        return IndexTensors(*(t.to(device) if t is not None else None for t in moved))

    def validate(self) -> IndexTensors:
        """Check shapes and code ranges, and store the codes compactly (:func:`code_dtype`);
        returns self, or raises :class:`PoeemError`."""
        d = self.rotation.shape[0]
        if self.rotation.shape != (d, d) or self.codebooks.dim() != 3:
            raise PoeemError(
                "index tensors",
                "rotation (dim, dim) and codebooks (D, K, dsub) or (D, K, dim)",
                f"{tuple(self.rotation.shape)} and {tuple(self.codebooks.shape)}",
                "export the index from a trained PoeemLayer",
            )
        m, k, dsub = self.codebooks.shape
        n = self.codes.shape[0]
        shapes_ok = (
            (m * dsub == d or dsub == d)
            and self.codes.shape == (n, m)
            and self.coarse_codes.shape == (n,)
            and self.ids.shape == (n,)
            and (self.coarse is None or (self.coarse.dim() == 2 and self.coarse.shape[1] == d))
            and (self.vectors is None or tuple(self.vectors.shape) == (n, d))
        )
        if not shapes_ok:
            raise PoeemError(
                "index tensors",
                f"codes (n, {m}), coarse_codes (n,), ids (n,) and coarse (nlist, {d})",
                f"codes {tuple(self.codes.shape)}, coarse_codes {tuple(self.coarse_codes.shape)}, "
                f"ids {tuple(self.ids.shape)}"
                + (f", vectors {tuple(self.vectors.shape)}" if self.vectors is not None else ""),
                "pass one row of codes, one list, one id (and one vector) per item",
            )
        _check_range("sub-codes", self.codes, k, "K")
        _check_range("coarse codes", self.coarse_codes, self.nlist, "nlist")
        self.codes = self.codes.to(code_dtype(k))
        self.coarse_codes = self.coarse_codes.to(code_dtype(self.nlist))
        if n and int(self.ids.min()) < 0:
            raise PoeemError(
                "ids", "non-negative integers", f"min {int(self.ids.min())}", "-1 means 'no result'"
            )
        return self

    def to_dict(self) -> dict[str, torch.Tensor]:
        """Flat name -> tensor mapping for safetensors (the vectors, if any, are saved apart)."""
        out = {
            "rotation": self.rotation,
            "codebooks": self.codebooks,
            "coarse_codes": self.coarse_codes,
            "codes": self.codes,
            "ids": self.ids,
        }
        if self.coarse is not None:
            out["coarse"] = self.coarse
        return {k: v.contiguous() for k, v in out.items()}

    @classmethod
    def from_dict(cls, d: dict[str, torch.Tensor]) -> IndexTensors:
        """Inverse of :meth:`to_dict`, validated; missing tensors are a clear error."""
        needed = ("rotation", "codebooks", "coarse_codes", "codes", "ids")
        missing = [k for k in needed if k not in d]
        if missing:
            raise PoeemError(
                "index codes file", f"tensors {list(needed)}", f"{missing} missing", "re-export the index"
            )
        return cls(
            rotation=d["rotation"],
            coarse=d.get("coarse"),
            codebooks=d["codebooks"],
            coarse_codes=d["coarse_codes"],
            codes=d["codes"],
            ids=d["ids"].long(),
        ).validate()


def code_dtype(n: int) -> torch.dtype:
    """The dtype :class:`IndexTensors` keeps codes in [0, n) in: uint8, int16 or int32 (torch's
    uint16 has no min, max, bincount or indexing)."""
    if n <= 1 << 8:
        return torch.uint8
    return torch.int16 if n <= 1 << 15 else torch.int32


def _check_range(what: str, codes: torch.Tensor, limit: int, name: str) -> None:
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise PoeemError(
            what, "integer codes", f"dtype {codes.dtype}", "pass the codes that layer.encode() returned"
        )
    if codes.dtype == torch.uint16:  # no min/max kernels for it
        codes = codes.int()
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= limit):
        raise PoeemError(
            what,
            f"values in [0, {name}={limit})",
            f"range [{int(codes.min())}, {int(codes.max())}]",
            "pass the codes that layer.encode() returned",
        )
