"""The codes of a trained model's items: what an export writes into the index.

An item is either encoded from scratch with the final parameters (a search over every list,
then over the codewords of its residual), or takes what its latest training step computed
(:attr:`poeem.PoeemLayer.trained`): its list, with only the residual encoded (``"lists"``, the
default of ``poeem export``: measured as good as encoding from scratch, without the list search
that grows with the catalogue), or its codes as they are (``"codes"``: the index as trained).
Codes an index distillation kept (``poeem train --distill-epochs``, ``--refit``) are taken as
they are by both: they are the index the distillation chose, and re-encoding them with its
codewords lost recall (docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, get_args

import torch
from tqdm.auto import tqdm

from poeem import distributed
from poeem.errors import PoeemError
from poeem.index import PoeemLayer
from poeem.index.quantize import smallest_uint_dtype
from poeem.metric import prepare_queries
from poeem.model import RetrievalModel

FromTraining = Literal["lists", "codes"]
EXPORT_DEFAULT: FromTraining = "lists"  # what `poeem export` reuses unless told otherwise


def check_from_training(value: str | None) -> None:
    """A clear error unless ``value`` is None or a :data:`FromTraining` choice."""
    if value is not None and value not in get_args(FromTraining):
        raise PoeemError(
            "from_training",
            "None, 'lists' or 'codes' (on the command line: none, lists or codes)",
            repr(value),
            "pick one of those",
        )


@torch.no_grad()
def encode_reusing(
    layer: PoeemLayer,
    rows: torch.Tensor,
    embed: Callable[[torch.Tensor], torch.Tensor],
    from_training: FromTraining | None,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Codes of the items ``rows``, reusing what training computed for those it coded since the
    index was fitted (``from_training``: "lists", "codes" or None for nothing).

    Args:
        layer: an initialized layer.
        rows: (n,) int64 item ids (on the CPU).
        embed: (m,) item ids -> (m, dim) embeddings as the layer encodes them; called only for
            the items that need encoding.
        from_training: see the module docstring.

    Returns:
        (n,) int64 coarse codes (None without IVF) and (n, D) int64 sub-codes, on the CPU.
    """
    c = layer.config
    codes = torch.empty(len(rows), c.num_subspaces, dtype=torch.long)
    coarse = torch.empty(len(rows), dtype=torch.long) if c.num_coarse else None
    memory = layer.trained if from_training is not None else None
    kept = torch.zeros(len(rows), dtype=torch.bool)  # items whose list comes from training
    whole = torch.zeros(len(rows), dtype=torch.bool)  # and whose codes do too
    if memory is not None:
        on_device = rows.to(memory.step.device)
        seen = memory.seen(on_device).cpu()
        whole = seen if from_training == "codes" else memory.distilled(on_device).cpu()
        kept = seen if coarse is not None else whole  # no lists to keep without IVF
        if coarse is not None and memory.coarse_codes is not None:
            coarse[kept] = memory.coarse_codes[on_device[kept.to(on_device.device)]].long().cpu()
        codes[whole] = memory.codes[on_device[whole.to(on_device.device)]].long().cpu()
    for mask, keep_lists in ((~kept, False), (kept & ~whole, True)):
        if not bool(mask.any()):
            continue
        lists = coarse[mask] if keep_lists and coarse is not None else None
        fresh_coarse, fresh = layer.encode(embed(rows[mask]), lists=lists)
        codes[mask] = fresh.long().cpu()
        if coarse is not None and fresh_coarse is not None:
            coarse[mask] = fresh_coarse.long().cpu()
    return coarse, codes


@torch.no_grad()
def item_codes(
    model: RetrievalModel,
    item_features: torch.Tensor | None = None,
    chunk: int = 1 << 18,
    progress: bool = False,
    from_training: FromTraining | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The codes of every item, each rank encoding its share and all ranks gathering them.

    ``from_training`` None embeds and encodes every item with the final model; "lists" and
    "codes" reuse what training computed (see the module docstring and :func:`encode_reusing`).
    Items are embedded and encoded ``chunk`` at a time, so memory holds the codes and one chunk
    of embeddings, never all of them.

    Args:
        model: a trained model with an initialized Poeem layer.
        item_features: (num_items, Fi) features of every item, or None.
        chunk: items embedded and encoded at once.
        progress: show a progress bar (rank 0, on a terminal).
        from_training: None, "lists" or "codes".

    Returns:
        (num_items,) coarse codes (None without IVF) and (num_items, D) sub-codes, in id order, in
        the smallest integer dtypes that hold coarse_K and K.
    """
    index = model.index
    assert index is not None
    check_from_training(from_training)
    share = distributed.shard(model.num_items)
    # preallocated in the dtypes layer.encode returns: at 50M items a list of chunks joined by
    # torch.cat, or int64 copies, cost gigabytes beside the table
    c, n = index.config, share.stop - share.start
    codes = torch.empty(n, c.num_subspaces, dtype=smallest_uint_dtype(c.codebook_size))
    coarse = torch.empty(n, dtype=smallest_uint_dtype(c.num_coarse)) if c.num_coarse else None

    def embed(rows: torch.Tensor) -> torch.Tensor:
        x = model.all_item_embeddings(item_features, rows=rows)
        return prepare_queries(x, model.config.search_metric, x.shape[1], "items")

    with tqdm(
        total=n,
        desc="encode items",
        unit="item",
        unit_scale=True,
        disable=None if progress and distributed.is_main() else True,
        leave=False,
    ) as bar:
        for lo in range(share.start, share.stop, chunk):
            hi = min(lo + chunk, share.stop)
            part_coarse, part = encode_reusing(index, torch.arange(lo, hi), embed, from_training)
            local = slice(lo - share.start, hi - share.start)
            codes[local] = part.to(codes.dtype)
            if coarse is not None and part_coarse is not None:
                coarse[local] = part_coarse.to(coarse.dtype)
            bar.update(hi - lo)
    if distributed.is_active():
        codes = distributed.gather_rows(codes.long()).to(codes.dtype)
        if coarse is not None:
            coarse = distributed.gather_rows(coarse.long()).to(coarse.dtype)
    return coarse, codes
