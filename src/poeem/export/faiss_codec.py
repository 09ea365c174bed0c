"""The FAISS codec: learned index tensors in, a ready FAISS index out, with no training.

The coarse centroids, PQ (or RQ) codebooks and rotation are copied in, ``is_trained`` is set, and the
item codes go in through FAISS's code-level API (``add_sa_codes``) exactly as the layer
computed them. Nothing here calls FAISS ``train()`` or re-encodes vectors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from poeem.errors import PoeemError
from poeem.index.config import IndexSpec
from poeem.index.quantize import is_residual
from poeem.index.tensors import IndexTensors
from poeem.metric import Metric, check_metric, list_rule, prepare_queries


def is_power_of_two(n: int) -> bool:
    """Whether n is 2**b for some b >= 1."""
    return n >= 2 and n & (n - 1) == 0


def nbits_of(codebook_size: int) -> int:
    """log2(K); FAISS PQ needs K to be a power of two."""
    if not is_power_of_two(codebook_size):
        raise PoeemError(
            "codebook_size for FAISS",
            "a power of two (16, 256, 4096 ...)",
            f"K={codebook_size}",
            "use K = 2**nbits",
        )
    return codebook_size.bit_length() - 1


def pack_sa_codes(
    coarse_codes: np.ndarray | None, codes: np.ndarray, coarse_code_size: int, nbits: int
) -> np.ndarray:
    """FAISS standalone codes: the list number little-endian in ``coarse_code_size`` bytes, then
    the D sub-codes packed least-significant bit first (two 4-bit codes share a byte).

    Args:
        coarse_codes: (n,) list numbers, or None for a flat PQ.
        codes: (n, D) sub-codes.

    Returns:
        (n, coarse_code_size + ceil(D * nbits / 8)) uint8.
    """
    n = codes.shape[0]
    if nbits == 8:
        pq_bytes = codes.astype(np.uint8, copy=False)
    else:  # FAISS's own packer: 4 bytes per code in a temporary (a bit array took 8 per bit)
        pq_bytes = faiss.pack_bitstrings(np.ascontiguousarray(codes, dtype=np.int32), nbits)
    if coarse_codes is None or coarse_code_size == 0:
        return np.ascontiguousarray(pq_bytes)
    lists = coarse_codes.astype("<u8").view(np.uint8).reshape(n, 8)[:, :coarse_code_size]
    return np.ascontiguousarray(np.concatenate([lists, pq_bytes], axis=1))


def faiss_metric(metric: str) -> int:
    """The FAISS metric constant of a poeem metric (cosine is inner product on normalised vectors)."""
    return faiss.METRIC_L2 if list_rule(metric) == "l2" else faiss.METRIC_INNER_PRODUCT


def _is_identity(m: torch.Tensor) -> bool:
    return bool(torch.equal(m, torch.eye(m.shape[0], dtype=m.dtype)))


def default_fast_scan(config: IndexSpec) -> bool:
    """Whether an index directory holds a layer's index as 4-bit fast scan when no flag says:
    yes for PQ codes with K = 16 (the layer's default; docs/design.md, "Codebook size"), a plain
    IVF-PQ otherwise."""
    return config.quantizer == "pq" and config.codebook_size == 16


def factory_string(ix: IndexTensors, fast_scan: bool = False) -> str:
    """The index :func:`build_faiss_index` makes of ``ix``, in FAISS's ``index_factory`` words:
    e.g. "IVF1024,PQ16x4fs" (fast scan), "PQ8x8", "IVF64,RQ8x8" (the rotation is not named)."""
    lists = f"IVF{ix.nlist}," if ix.coarse is not None else ""
    coder = "RQ" if is_residual(ix.codebooks, ix.dim) else "PQ"
    return (
        f"{lists}{coder}{ix.codebooks.shape[0]}x{nbits_of(ix.codebooks.shape[1])}{'fs' if fast_scan else ''}"
    )


def build_faiss_index(ix: IndexTensors, metric: Metric = "ip", fast_scan: bool = False) -> faiss.Index:
    """A FAISS index holding exactly the given learned index.

    IVF-PQ (``IndexIVFPQ``, by_residual) with a coarse quantizer, else ``IndexPQ`` in an
    ``IndexIDMap2``; residual-quantizer codebooks (D, K, dim) give ``IndexIVFResidualQuantizer``
    or ``IndexResidualQuantizer`` instead (inner products from look-up tables, no stored norm;
    L2 decodes each scanned code); inside an ``IndexPreTransform`` when there is a rotation (a
    ``LinearTransform`` with A = R^T) or the metric is cosine (a ``NormalizationTransform`` first).

    Args:
        ix: the learned index tensors.
        metric: "ip", "cosine" or "l2".
        fast_scan: 4-bit fast-scan variant (needs K = 16); its scores use 8-bit lookup tables,
            so they are approximate.
    """
    check_metric(metric)
    ix.validate()
    d, m, k = ix.dim, ix.codebooks.shape[0], ix.codebooks.shape[1]
    nbits = nbits_of(k)
    if fast_scan and nbits != 4:
        raise PoeemError("fast_scan", "K = 16 (4-bit codes)", f"K={k}", "export without --fast-scan")
    fmetric = faiss_metric(metric)
    centroids = ix.codebooks.numpy().astype(np.float32).ravel()  # (D, K, dsub) flattened
    ids = ix.ids.numpy().astype(np.int64)
    if is_residual(ix.codebooks, d):
        if fast_scan:
            raise PoeemError(
                "fast_scan",
                "product-quantization codes",
                "a residual quantizer",
                "export without --fast-scan, or a refitted run's index as trained "
                "(poeem export --as-trained; PQ codes with K = 16)",
            )
        inner = _residual_index(ix, fmetric, nbits, centroids, ids)
    elif ix.coarse is not None:
        inner = faiss.IndexIVFPQ(_list_quantizer(ix, fmetric), d, ix.nlist, m, nbits, fmetric)
        faiss.copy_array_to_vector(centroids, inner.pq.centroids)
        inner.is_trained = True
        inner.precompute_table()
        packed = pack_sa_codes(ix.coarse_codes.numpy(), ix.codes.numpy(), inner.coarse_code_size(), nbits)
        inner.add_sa_codes(packed, ids)
        if fast_scan:
            inner = faiss.IndexIVFPQFastScan(inner)
    else:
        pq_index = faiss.IndexPQ(d, m, nbits, fmetric)
        faiss.copy_array_to_vector(centroids, pq_index.pq.centroids)
        pq_index.is_trained = True
        inner = faiss.IndexIDMap2(pq_index)
        inner.add_sa_codes(pack_sa_codes(None, ix.codes.numpy(), 0, nbits), ids)
        if fast_scan:  # IndexPQFastScan takes no codes itself: convert the filled IndexPQ
            fast = faiss.IndexPQFastScan(pq_index)
            inner.index = fast
            # a self-contained copy: the id map no longer points at objects of this function
            inner = faiss.deserialize_index(faiss.serialize_index(inner))
    return search_ready(_behind_transforms(inner, ix, metric))


def search_ready(index: faiss.Index) -> faiss.Index:
    """``index`` with the one set of search settings that every poeem search uses, whether the
    index was read from a file (``faiss.read_index``) or built in memory; changed in place and
    returned. Settings that are already right are left alone, so calling it again is cheap.

    - IVF-PQ (fast scan or not): FAISS's precomputed tables, chosen as ``read_index`` chooses
      them (for L2 by residual, ``use_precomputed_table`` = 1 when the table fits in
      ``precomputed_table_max_bytes``). FAISS's conversion to fast scan copies the tables but
      not that flag, and fast scan rounds the look-up tables of the two ways differently: the
      same codes would score differently in an index built in memory and one read from disk.
    - No polysemous (Hamming) pre-filter: every probed code is scored.
    - Fast scan: FAISS's own choice of kernel and query blocks (``implem``, ``qbs`` 0).

    nprobe is no setting of the index: each search passes it
    (:func:`poeem.search.faiss_backend.search_parameters`).
    """
    core = faiss.downcast_index(index)
    while isinstance(core, faiss.IndexPreTransform | faiss.IndexIDMap):
        core = faiss.downcast_index(core.index)
    if isinstance(core, faiss.IndexIVFPQ | faiss.IndexIVFPQFastScan):
        _precomputed_tables(core)
    settings = {"polysemous_ht": 0, "implem": 0, "qbs": 0, "qbs2": 0}
    if isinstance(core, faiss.IndexPQ):
        settings["search_type"] = faiss.IndexPQ.ST_PQ
    for name, value in settings.items():
        if hasattr(core, name) and getattr(core, name) != value:
            setattr(core, name, value)
    return index


def _precomputed_tables(ivf: Any) -> None:
    """FAISS's precomputed tables of an IVF-PQ (fast scan or not), as ``read_index`` makes them
    (``precompute_table`` with the flag at 0 lets FAISS choose); only L2 by residual uses them.
    Computed once: an index that has them, or whose table is too big to have, is left alone."""
    if not (ivf.by_residual and ivf.metric_type == faiss.METRIC_L2):
        return
    full = ivf.nlist * ivf.pq.M * ivf.pq.ksub
    if ivf.use_precomputed_table == 1 and ivf.precomputed_table.size() == full:
        return
    if ivf.use_precomputed_table == 0 and 4 * full > faiss.cvar.precomputed_table_max_bytes:
        return  # FAISS's own choice: no table
    ivf.use_precomputed_table = 0
    ivf.precompute_table()


def build_float_lists_index(ix: IndexTensors, items: torch.Tensor, metric: Metric = "ip") -> faiss.Index:
    """The learned index's routing with the items' float vectors in its lists, in place of codes.

    An IVF-Flat index on the same coarse centroids, behind the same rotation (and normalisation
    for cosine), each item in the list the learned index put it in. Its scores are exact, so at
    each nprobe it reaches what a perfect code in these lists would: the recall lost to routing
    and the recall lost to the codes, told apart.

    Args:
        ix: a learned index with lists (``coarse`` not None), e.g. from ``learned_index``.
        items: (n, dim) the item embeddings of ``ix``'s n items, in its order.
        metric: "ip", "cosine" or "l2", as the learned index is searched.
    """
    check_metric(metric)
    ix.validate()
    if ix.coarse is None:
        raise PoeemError(
            "float lists", "a learned index with IVF lists", "no lists (num_coarse 0)", "use exact search"
        )
    if tuple(items.shape) != (ix.ntotal, ix.dim):
        raise PoeemError(
            "items",
            f"shape ({ix.ntotal}, {ix.dim}), one row per indexed item",
            f"shape {tuple(items.shape)}",
            "pass the indexed items in order",
        )
    x = prepare_queries(items, metric, ix.dim, "items") @ ix.rotation  # as the transforms store it
    x = np.ascontiguousarray(x.numpy(), dtype=np.float32)
    inner = faiss.IndexIVFFlat(
        _list_quantizer(ix, faiss_metric(metric)), ix.dim, ix.nlist, faiss_metric(metric)
    )
    lists = np.ascontiguousarray(ix.coarse_codes.numpy(), dtype=np.int64)
    ids = np.ascontiguousarray(ix.ids.numpy(), dtype=np.int64)
    inner.add_core(len(x), faiss.swig_ptr(x), faiss.swig_ptr(ids), faiss.swig_ptr(lists))
    return _behind_transforms(inner, ix, metric)


def _behind_transforms(inner: faiss.Index, ix: IndexTensors, metric: Metric) -> faiss.Index:
    """``inner`` behind the learned index's rotation (a ``LinearTransform`` with A = R^T), and a
    ``NormalizationTransform`` before it for cosine; ``inner`` itself when there is neither."""
    d = ix.dim
    transforms = []
    if metric == "cosine":
        transforms.append(faiss.NormalizationTransform(d, 2.0))
    if not _is_identity(ix.rotation):
        lt = faiss.LinearTransform(d, d, False)
        faiss.copy_array_to_vector(
            np.ascontiguousarray(ix.rotation.numpy().T, dtype=np.float32).ravel(), lt.A
        )
        faiss.copy_array_to_vector(np.zeros(d, dtype=np.float32), lt.b)
        lt.is_trained = True
        lt.have_bias = False
        transforms.append(lt)
    if not transforms:
        return inner
    index = faiss.IndexPreTransform(inner)
    for t in reversed(transforms):  # prepend_transform: the last prepended runs first
        index.prepend_transform(t)
    return index


def _list_quantizer(ix: IndexTensors, fmetric: int) -> faiss.IndexFlat:
    """A flat index of the coarse centroids, the coarse quantizer of an IVF index."""
    quantizer = faiss.IndexFlat(ix.dim, fmetric)
    quantizer.add(np.ascontiguousarray(ix.coarse.numpy(), dtype=np.float32))
    return quantizer


def _residual_index(
    ix: IndexTensors, fmetric: int, nbits: int, codebooks: np.ndarray, ids: np.ndarray
) -> faiss.Index:
    """FAISS IVF-RQ (or RQ in an id map) holding the given residual-quantizer index."""
    d, m = ix.dim, ix.codebooks.shape[0]
    aq = faiss.AdditiveQuantizer
    search_type = aq.ST_LUT_nonorm if fmetric == faiss.METRIC_INNER_PRODUCT else aq.ST_decompress
    if ix.coarse is not None:
        quantizer = _list_quantizer(ix, fmetric)
        holder = faiss.IndexIVFResidualQuantizer(quantizer, d, ix.nlist, m, nbits, fmetric, search_type)
    else:
        holder = faiss.IndexResidualQuantizer(d, m, nbits, fmetric, search_type)
    faiss.copy_array_to_vector(codebooks, holder.rq.codebooks)  # (D * K, dim), stage-major
    holder.rq.is_trained = holder.is_trained = True
    index = holder if ix.coarse is not None else faiss.IndexIDMap2(holder)
    lists = ix.coarse_codes.numpy() if ix.coarse is not None else None
    code_size = holder.coarse_code_size() if ix.coarse is not None else 0
    index.add_sa_codes(pack_sa_codes(lists, ix.codes.numpy(), code_size, nbits), ids)
    return index


@dataclass
class FaissQuantizer:
    """The trained parts of a FAISS IVF-PQ, PQ, IVF-RQ or RQ index, as a Poeem layer holds them.

    dim: the vectors' dimension; settings: PoeemConfig fields (num_coarse, num_subspaces,
    codebook_size, rotation, coarse_metric); metric: "ip", "cosine" or "l2"; rotation:
    (dim, dim) R, x @ R being the coded vector (FAISS's A^T); coarse: (coarse_K, dim) or None;
    codebooks: (D, K, dsub), or (D, K, dim) for a residual quantizer (settings' quantizer "rq").
    """

    dim: int
    settings: dict[str, Any]
    metric: Metric
    rotation: torch.Tensor
    coarse: torch.Tensor | None
    codebooks: torch.Tensor


def read_faiss_quantizer(path: str | Path) -> FaissQuantizer:
    """The quantizer of a FAISS index file, see :func:`faiss_quantizer` (the items' codes are
    not read). FAISS's file format holds no code, so reading is safe."""
    if not Path(path).is_file():
        raise PoeemError("FAISS index file", "an existing file", f"'{path}'", "check the path")
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as err:
        raise PoeemError(
            "FAISS index file", "a file written by faiss.write_index", str(err)[:200], "check the file"
        ) from None
    return faiss_quantizer(index)


def faiss_quantizer(owner: faiss.Index) -> FaissQuantizer:
    """The quantizer of a FAISS index (the inverse of :func:`build_faiss_index`).

    Takes an ``IndexIVFPQ`` (by residual) or ``IndexPQ``, optionally in an ``IndexIDMap`` and
    behind an ``IndexPreTransform`` of a normalisation (cosine) and one square linear map (OPQ);
    or the same with a residual quantizer (``IndexIVFResidualQuantizer``,
    ``IndexResidualQuantizer``) of equal-bit stages, without the linear map. The layer encodes
    greedily (FAISS's ``max_beam_size = 1``), so its codes of an RQ file can differ from the
    file's own (trained with a wider beam); the codebooks are the file's.
    ``owner`` owns every sub-index read here, so it stays referenced until the end.
    """
    if not owner.is_trained:
        raise PoeemError(
            "FAISS index", "a trained index", "an untrained one", "call index.train(x) before writing it"
        )
    metric: Metric = "ip"
    rotation = None
    index = faiss.downcast_index(owner)
    if isinstance(index, faiss.IndexPreTransform):
        pre = index
        for i in range(pre.chain.size()):
            t = faiss.downcast_VectorTransform(pre.chain.at(i))
            if isinstance(t, faiss.NormalizationTransform) and rotation is None:
                metric = "cosine"
            elif isinstance(t, faiss.LinearTransform) and t.d_in == t.d_out and rotation is None:
                a = faiss.vector_to_array(t.A).reshape(t.d_out, t.d_in)
                if t.have_bias and np.abs(faiss.vector_to_array(t.b)).max() > 0:
                    raise PoeemError("FAISS transform", "a rotation without bias", "a bias", "drop the bias")
                rotation = torch.from_numpy(a.T.copy())
            else:
                raise PoeemError(
                    "FAISS transform",
                    "a normalisation, then one square linear map (OPQ)",
                    type(t).__name__,
                    "export the index without other transforms",
                )
        index = pre.index
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexIDMap):
        inner = faiss.downcast_index(inner.index)
    ivf = faiss.try_extract_index_ivf(inner)
    holder = faiss.downcast_index(ivf) if ivf is not None else inner
    pq, rq = getattr(holder, "pq", None), getattr(holder, "rq", None)
    if (pq is None and rq is None) or (ivf is not None and not ivf.by_residual):
        raise PoeemError(
            "FAISS index",
            "an IVF-PQ or IVF-RQ (by residual), PQ or RQ index",
            type(inner).__name__,
            "distil from an IndexIVFPQ, IndexIVFResidualQuantizer, IndexPQ or IndexResidualQuantizer "
            "file, or fit a new index with the layer flags",
        )
    if inner.metric_type == faiss.METRIC_L2:
        metric = "l2"
    d = inner.d
    coarse = None
    if ivf is not None:
        coarse = torch.from_numpy(faiss.downcast_index(ivf.quantizer).reconstruct_n(0, ivf.nlist))
    if rq is not None:
        stage_bits = set(faiss.vector_to_array(rq.nbits).tolist())
        if len(stage_bits) != 1 or rotation is not None:
            raise PoeemError(
                "FAISS residual quantizer",
                "stages of equal bits, without a rotation",
                f"bits {sorted(stage_bits)}" + (", and a rotation" if rotation is not None else ""),
                "train it as RQ{M}x{bits} without OPQ",
            )
        m, ksub = rq.M, 1 << stage_bits.pop()
        codebooks = torch.from_numpy(faiss.vector_to_array(rq.codebooks).reshape(m, ksub, d).copy())
    else:
        m, ksub = pq.M, pq.ksub
        codebooks = torch.from_numpy(faiss.vector_to_array(pq.centroids).reshape(m, ksub, pq.dsub).copy())
    settings = {
        "num_coarse": 0 if ivf is None else ivf.nlist,
        "num_subspaces": m,
        "codebook_size": ksub,
        "rotation": "none" if rotation is None else "opq",
        "coarse_metric": "l2" if metric == "l2" else "ip",
        **({"quantizer": "rq"} if rq is not None else {}),
    }
    return FaissQuantizer(
        d, settings, metric, rotation if rotation is not None else torch.eye(d), coarse, codebooks
    )
