"""The items' own vectors, kept beside their codes at a chosen precision to re-rank a search's
candidates (as ScaNN's reorder and FAISS's refine do).

Three precisions, by bytes per item at dimension ``dim``:

- ``"float"``: float32, 4 dim bytes, the vectors exactly;
- ``"fp16"``: float16, 2 dim bytes;
- ``"sq8"``: one byte per dimension, a uniform scalar quantizer trained per dimension on the
  exported items (their min and max, as FAISS's ``SQ8``), stored in the manifest; values
  added later outside that range are clamped to it.

The vectors are the items as the index codes them (L2-normalised for a cosine index).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch

from poeem.errors import PoeemError

Precision = Literal["fp16", "sq8", "float"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
VECTORS_ROLE = "vectors"  # the base's vectors-<v>.safetensors; segments keep theirs in their own file
_STORED = {"float": torch.float32, "fp16": torch.float16, "sq8": torch.uint8}
_SQ8_LEVELS = 255


def check_precision(precision: object, what: str = "--rerank") -> Precision:
    """``precision`` if it is one of :data:`PRECISIONS`, else a clear error."""
    if precision not in PRECISIONS:
        raise PoeemError(what, f"one of {', '.join(PRECISIONS)}", repr(precision), "pick one of those")
    return precision  # type: ignore[return-value]


@dataclass(frozen=True)
class VectorCodec:
    """How item vectors are stored: the precision, and for ``"sq8"`` the per-dimension range.

    precision: "float", "fp16" or "sq8".
    lo, hi: (dim,) float32 smallest and largest value of each dimension (sq8 only).
    """

    precision: Precision
    lo: torch.Tensor | None = None
    hi: torch.Tensor | None = None

    @classmethod
    def fit(cls, precision: str, x: torch.Tensor) -> VectorCodec:
        """A codec for ``precision`` trained on (n, dim) float vectors ``x`` (sq8: their range)."""
        precision = check_precision(precision)
        if precision != "sq8":
            return cls(precision)
        if not x.shape[0]:
            raise PoeemError("--rerank sq8", "at least one item to train on", "none", "export some items")
        x = x.float()
        return cls(precision, x.amin(0).contiguous(), x.amax(0).contiguous())

    @property
    def dtype(self) -> torch.dtype:
        """The dtype stored vectors have: float32, float16 or uint8."""
        return _STORED[self.precision]

    def bytes_per_item(self, dim: int) -> int:
        """Bytes one item's vector takes: 4, 2 or 1 times ``dim``."""
        return dim * self.dtype.itemsize

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(n, dim) float vectors -> (n, dim) stored rows in :attr:`dtype`, on the CPU."""
        x = x.detach().float().cpu()
        if self.precision != "sq8":
            return x.to(self.dtype).contiguous()
        assert self.lo is not None and self.hi is not None
        span = self.hi - self.lo
        scale = torch.where(span > 0, _SQ8_LEVELS / span.clamp_min(1e-30), torch.zeros_like(span))
        levels = torch.round((x - self.lo) * scale).clamp_(0, _SQ8_LEVELS)  # (n, dim)
        return levels.to(torch.uint8).contiguous()

    @property
    def step(self) -> torch.Tensor:
        """(dim,) float32 value of one SQ8 level in each dimension: a row decodes to lo + r step."""
        assert self.lo is not None and self.hi is not None, "sq8 only"
        return (self.hi - self.lo) / _SQ8_LEVELS

    def decode(self, stored: torch.Tensor) -> torch.Tensor:
        """(..., dim) stored rows -> (..., dim) float32 vectors (on the rows' device)."""
        if self.precision != "sq8":
            return stored.float()
        assert self.lo is not None
        return self.lo.to(stored.device) + stored.float() * self.step.to(stored.device)

    def check_rows(self, stored: torch.Tensor, n: int, dim: int, what: str) -> torch.Tensor:
        """``stored`` if it is (n, dim) rows of :attr:`dtype`, else a clear error naming ``what``."""
        if stored.dtype != self.dtype or tuple(stored.shape) != (n, dim):
            raise PoeemError(
                what,
                f"({n}, {dim}) {self.dtype} item vectors ({self.precision}, one row per item)",
                f"{tuple(stored.shape)} {stored.dtype}",
                "re-export the index with 'poeem export --rerank'",
            )
        return stored

    def to_manifest(self) -> dict[str, Any]:
        """What the manifest's ``rerank`` field records."""
        out: dict[str, Any] = {"precision": self.precision}
        if self.lo is not None and self.hi is not None:
            out["lo"], out["hi"] = self.lo.tolist(), self.hi.tolist()
        return out

    @classmethod
    def from_manifest(cls, raw: Any, dim: int) -> VectorCodec:
        """The codec a manifest's ``rerank`` field records, validated."""
        fix = "re-export the index with 'poeem export --rerank'"
        if not isinstance(raw, dict) or set(raw) - {"precision", "lo", "hi"}:
            raise PoeemError(
                "index manifest field 'rerank'", "an object of precision (and lo, hi)", repr(raw)[:80], fix
            )
        precision = check_precision(raw.get("precision"), "index manifest field 'rerank.precision'")
        if precision != "sq8":
            if "lo" in raw or "hi" in raw:
                raise PoeemError("index manifest field 'rerank'", "no lo/hi but for sq8", precision, fix)
            return cls(precision)
        bounds = []
        for name in ("lo", "hi"):
            value = raw.get(name)
            ok = (
                isinstance(value, list)
                and len(value) == dim
                and all(
                    isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value
                )
            )
            if not ok:
                raise PoeemError(
                    f"index manifest field 'rerank.{name}'", f"{dim} finite numbers", repr(value)[:80], fix
                )
            bounds.append(torch.tensor(value, dtype=torch.float32))
        if bool((bounds[0] > bounds[1]).any()):
            raise PoeemError("index manifest field 'rerank'", "lo <= hi in every dimension", "lo > hi", fix)
        return cls(precision, bounds[0], bounds[1])
