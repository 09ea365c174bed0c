"""Index distillation: teach a trained index the model's own ranking (Distill-VQ's idea).

The embeddings stay frozen. For each batch of queries the teacher is the exact score <q, x_d>
over the candidates: every query's exact top ``teacher_k`` items, pooled over the batch (so each
query also sees the others' candidates, like in-batch negatives). Two students score the same
candidates with the index: the list score <qR, c_list(d)> and the code score
<qR, c_list(d) + PQ(d)>. Each is pulled to the teacher with a ListNet loss,
``-sum softmax(t / tau) * log softmax(s / tau)``, which moves the coarse centroids, the
codebooks (a residual quantizer's stages each by their own scale) and (for a learned rotation,
Givens or Cayley) the rotation. No labels are needed.

The item assignments (lists and codes) stay frozen while the codewords move, so the codebooks
cannot collapse the way a task gradient with live re-assignment does; with ``reassign`` they are
recomputed between rounds.

The held-out queries pick the epoch kept (by their code loss; its parameters with the codes they
were scored with, or re-encoded codes if those score better), end a round after ``patience``
epochs that do not improve on the round's best and stop after a round that found nothing better
than an earlier one; then they guard the result: each
one's mean exact score of the items that the code student ranks in its top ``guard_k`` (the
depth you serve; among the queries' candidates and up to 16,384 random items, which training
never sees) is measured for the starting and for the distilled index, and if distillation
lowered it by more than two standard errors of the per-query difference, the starting index is
kept. A swap between items the model scores almost alike barely moves that mean; an unrelated
item in the top-k does.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from poeem.errors import PoeemError
from poeem.index import PoeemLayer
from poeem.index.quantize import pq_reconstruct
from poeem.options import Bounds, Count, NonNegative, Positive, PositiveInt, Seed, check_settings, setting
from poeem.search.exact import FlatIndex
from poeem.training.checkpoint import read_checkpoint, restore_checkpoint, save_checkpoint

GUARD_ITEMS = 16384  # random items the guard scores besides the held-out queries' top-k
GUARD_Z = 2.0  # the start is kept when distillation lowered the guard score by this many standard errors
GUARD_K = 10  # the guard's depth when DistillConfig.guard_k is None
MAX_HELDOUT = 1024  # held-out queries at most: enough to pick an epoch, cheap to score
MAX_QUERIES = 1 << 15  # queries the teacher ranks at most, by default (a sample of more)
Codes = tuple[torch.Tensor | None, torch.Tensor]  # the items' (n,) lists (None without) and (n, D) codes
# the best epoch: its held-out loss, parameters, history row, and the codes it was measured with
Best = tuple[float, list[torch.Tensor], dict[str, float], Codes]
# the starting index: parameters, codes, and its held-out queries' guard scores (None: no held-out)
Start = tuple[list[torch.Tensor], Codes, torch.Tensor | None]


@dataclass
class DistillConfig:
    """How the index is distilled.

    rounds: passes of ``epochs`` epochs each; item codes are frozen within a round.
    reassign: re-encode the items between rounds (else their first codes are kept: JPQ-style).
    teacher_k: the exact top-k per query that the teacher ranks.
    temperature: of both softmaxes, in score units; None: the mean over queries of the std of
        their teacher top-k scores.
    list_weight: weight of the list student's loss (the code student has weight 1; 0: not scored).
    coarse_lr, codebook_lr, rotation_lr: Adam's learning rates (coarse_lr 0: the coarse
        centroids stay, and with them every item's list); a residual quantizer's later stages
        take a share of codebook_lr, their codewords' starting RMS over the first stage's.
    max_queries: queries the teacher ranks at most (None: all): a larger set is sampled once
        (by ``seed``). The exact top-k scores every item for each of them, and every epoch
        passes over them, so this bounds both on catalogues with millions of queries.
    holdout: share of the queries (at most 1,024) kept out of training; after every epoch their
        loss is measured, and the index of the best epoch is the one kept (early stopping).
    patience: a round ends after this many epochs in a row that did not improve on the round's
        best held-out loss, and distillation stops after a round that found no better loss than
        an earlier one (None: every epoch of every round runs).
    guard_k: the depth the guard watches, the k you serve (None: ``GUARD_K``): the starting
        index is kept if distillation lowered the held-out queries' mean exact score of their
        top ``guard_k`` by more than ``GUARD_Z`` standard errors.
    """

    rounds: PositiveInt = setting(3, help="Rounds; item codes are re-assigned between them.")
    epochs: PositiveInt = setting(10, help="Passes over the queries per round.")
    reassign: bool = setting(True, help="Re-assign item codes between rounds.")
    teacher_k: PositiveInt = setting(100, help="Exact top-k per query that the teacher ranks.")
    max_queries: Count | None = setting(
        MAX_QUERIES,
        help="Queries the teacher ranks at most; more are sampled (their exact top-k scores every "
        "item, and every epoch passes over them); 0: all.",
    )
    batch_size: PositiveInt = 128
    temperature: Positive | None = setting(
        None,
        help="Of the teacher's and students' softmax, in score units (default: the mean std of the "
        "queries' teacher top-k scores; raise it if the starting index is kept).",
    )
    list_weight: NonNegative = 1.0
    coarse_lr: NonNegative = 1e-3
    codebook_lr: NonNegative = 1e-3
    rotation_lr: NonNegative = 1e-3
    holdout: Annotated[float, Bounds(ge=0, lt=1)] = 0.1
    patience: Count | None = setting(
        3,
        help="A round ends after this many epochs that do not improve on its best held-out loss, "
        "and distillation stops after a round that found nothing better than an earlier one; 0: "
        "run every epoch.",
    )
    guard_k: PositiveInt | None = setting(
        None,
        help="The depth you serve: the starting index is kept if distillation lowered the held-out "
        "queries' top-k (default: a run's smallest evaluated k; 10 with --items).",
    )
    seed: Seed = 0

    def __post_init__(self) -> None:
        check_settings(self, "distill")
        if self.patience == 0:  # how the command line says None
            self.patience = None
        if self.max_queries == 0:
            self.max_queries = None

    def keeping_lists(self) -> DistillConfig:
        """This config with the coarse centroids, and so every item's list, frozen (coarse_lr 0,
        no list student): how a refit, whose lists joint training made, is distilled."""
        return replace(self, coarse_lr=0.0, list_weight=0.0)


@dataclass
class DistillResult:
    """The distilled codes and what the loss did.

    coarse_codes: (n,) int64 list of each item, or None without lists; codes: (n, D) int64.
    history: one row per epoch run: round, epoch, mean ListNet loss of each student, and the
        held-out queries' code loss (rounds that ``patience`` ended early have fewer rows).
    best: the history row of the best epoch. Its parameters are kept, with the codes they were
        measured with, or (``reassign``) the items re-encoded with them if the held-out queries'
        code loss is lower so (``reencoded``).
    guard: the held-out queries' mean exact score of the code student's top ``guard_k`` items
        ("k"), for the starting index ("start") and the best epoch's ("distilled"), and the
        standard error of their per-query difference ("stderr"); empty without held-out queries.
    kept_start: the starting index was kept (distillation lowered that score by more than
        ``GUARD_Z`` standard errors).
    """

    coarse_codes: torch.Tensor | None
    codes: torch.Tensor
    history: list[dict[str, float]] = field(default_factory=list)
    best: dict[str, float] = field(default_factory=dict)
    guard: dict[str, float] = field(default_factory=dict)
    kept_start: bool = False
    reencoded: bool = False


def listnet(teacher: torch.Tensor, student: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over rows of ``-sum softmax(teacher / T) * log softmax(student / T)``; (B, M) scores."""
    target = F.softmax(teacher / temperature, dim=-1)
    return -(target * F.log_softmax(student / temperature, dim=-1)).sum(-1).mean()


def distill_index(
    layer: PoeemLayer,
    items: torch.Tensor,
    queries: torch.Tensor,
    config: DistillConfig | None = None,
    progress: bool = True,
    checkpoint: Path | None = None,
    resume: bool = False,
) -> DistillResult:
    """Distill ``layer``'s index (in place) from the exact ranking of ``queries`` over ``items``.

    Args:
        layer: an initialized :class:`PoeemLayer` (its centroids, codebooks and Givens angles train).
        items: (n, dim) item embeddings, as the layer sees them (cosine models: normalised).
        queries: (nq, dim) query embeddings, as searched (any query set: logged, generated,
            the training queries); no labels.
        config: see :class:`DistillConfig`.
        progress: show a progress bar.
        checkpoint: a file that the whole state is written to after every epoch (atomically, so
            stopping at any moment leaves the last epoch's state).
        resume: continue from ``checkpoint``, exactly where it stopped (the same layer, inputs
            and config are required).

    Returns:
        The items' final codes (export them with the layer) and the loss history. A layer that
        remembers its items' codes (``num_items`` = n, items in id order, as in a run) keeps
        them there (:meth:`poeem.index.trained_codes.TrainedCodes.keep_distilled`), so that an
        export serves them as they are.
    """
    cfg = config or DistillConfig()
    _check_inputs(layer, items, queries, cfg)
    if layer.trained is not None:  # the codewords move: the codes of training no longer fit them
        layer.trained.forget()
    device = layer.codebooks.device
    items, queries = items.detach().float().to(device), queries.detach().float().to(device)
    g = torch.Generator().manual_seed(cfg.seed)
    teacher = _Teacher(layer, items, queries, cfg, g)
    optimizer, trained = _optimizer(layer, cfg)
    history: list[dict[str, float]] = []
    best: Best | None = None
    inputs = {"config": asdict(cfg), "items": _fingerprint(items), "queries": _fingerprint(queries)}
    done = 0
    if resume:
        if checkpoint is None:
            raise PoeemError("distill resume", "a checkpoint file", "None", "pass checkpoint=PATH")
        done, history, best, codes, start = _restore(checkpoint, layer, optimizer, g, inputs, trained)
    else:
        codes = layer.encode(items)  # in the smallest dtypes (uint8 for K <= 256) while frozen
        start = ([p.detach().clone() for p in trained], codes, teacher.guard_scores(codes))
    stage_steps = _stage_steps(layer, start[0][0])
    fit = teacher.fit
    per_epoch = -(-fit.numel() // cfg.batch_size)
    total = cfg.rounds * cfg.epochs
    bar = tqdm(
        total=total * per_epoch,
        initial=done * per_epoch,
        desc="distill",
        disable=None if progress else True,
        leave=False,
    )

    step = done
    while step < total:
        round_no, epoch = divmod(step, cfg.epochs)
        if round_no and not epoch and cfg.reassign:
            codes = layer.encode(items)
        order = fit[torch.randperm(fit.numel(), generator=g).to(device)]
        losses = _train_epoch(teacher, optimizer, codes, order, stage_steps, bar)
        row = {"round": round_no, "epoch": epoch, **losses}
        if teacher.heldout.numel():
            row["heldout_code_loss"] = teacher.heldout_loss(codes)
            if best is None or row["heldout_code_loss"] < best[0]:
                best = (row["heldout_code_loss"], [p.detach().clone() for p in trained], row, codes)
        history.append(row)
        bar.set_postfix({k: f"{v:.4f}" for k, v in row.items() if k.endswith("loss")})
        following = _next_step(step, history, best, cfg)
        bar.update((following - step - 1) * per_epoch)  # the epochs that patience skips
        step = following
        if checkpoint is not None:
            _save_state(checkpoint, layer, optimizer, g, step, history, best, codes, inputs, start)
    bar.close()
    reencoded = False
    if best is not None:  # the index the held-out queries liked best: its parameters and its codes,
        _copy_into(trained, best[1])
        codes = best[3]
        if cfg.reassign:  # or the items re-encoded with those parameters, if they score better
            fresh = layer.encode(items)
            if teacher.heldout_loss(fresh) < best[0]:
                codes, reencoded = fresh, True
    elif cfg.reassign:
        codes = layer.encode(items)
    row = best[2] if best is not None else history[-1]
    result = DistillResult(*_as_long(codes), history, row, reencoded=reencoded)
    if start[2] is not None:
        _guard(result, teacher, start, trained)
    if layer.trained is not None and layer.trained.num_items == items.shape[0]:  # items in id order
        layer.trained.keep_distilled(result.coarse_codes, result.codes)
    return result


def _optimizer(layer: PoeemLayer, cfg: DistillConfig) -> tuple[torch.optim.Adam, list[torch.Tensor]]:
    """Adam over what distillation trains (codebooks, centroids unless their lr is 0, a learned
    rotation), and those parameters in order."""
    groups = [{"params": [layer.codebooks], "lr": cfg.codebook_lr}]
    if layer.coarse is not None and cfg.coarse_lr > 0:
        groups.append({"params": [layer.coarse], "lr": cfg.coarse_lr})
    if layer.learned_rotation is not None:
        groups.append({"params": list(layer.learned_rotation.parameters()), "lr": cfg.rotation_lr})
    return torch.optim.Adam(groups), [p for group in groups for p in group["params"]]


def _train_epoch(
    teacher: _Teacher,
    optimizer: torch.optim.Optimizer,
    codes: Codes,
    order: torch.Tensor,
    stage_steps: torch.Tensor | None,
    bar: tqdm,
) -> dict[str, float]:
    """One epoch over the training queries in ``order``; the mean code and list losses."""
    layer, cfg = teacher.layer, teacher.cfg
    sums, count = {"code_loss": 0.0, "list_loss": 0.0}, 0
    for rows in order.split(cfg.batch_size):
        code_loss, list_loss = teacher.losses(rows, codes)
        loss = code_loss if list_loss is None else code_loss + cfg.list_weight * list_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        before = layer.codebooks.detach().clone() if stage_steps is not None else None
        optimizer.step()
        if before is not None:  # each residual stage moves by its own scale
            with torch.no_grad():
                layer.codebooks.copy_(torch.lerp(before, layer.codebooks, stage_steps))
        sums["code_loss"] += float(code_loss.detach())
        sums["list_loss"] += float(list_loss.detach()) if list_loss is not None else 0.0
        count += 1
        bar.update(1)
    return {k: v / max(count, 1) for k, v in sums.items()}


def _guard(result: DistillResult, teacher: _Teacher, start: Start, trained: list[torch.Tensor]) -> None:
    """Keep the starting index (parameters and codes) in ``result`` if the model scores the
    distilled index's top-k lower on the held-out queries, by more than GUARD_Z standard errors;
    record both scores in ``result.guard``."""
    before, after = start[2], teacher.guard_scores((result.coarse_codes, result.codes))
    assert before is not None and after is not None
    diff = after - before
    stderr = float(diff.std() / diff.numel() ** 0.5) if diff.numel() > 1 else 0.0
    result.guard = {"start": float(before.mean()), "distilled": float(after.mean()), "stderr": stderr}
    result.guard["k"] = teacher.guard_k
    if float(diff.mean()) < -GUARD_Z * stderr:
        _copy_into(trained, start[0])
        (result.coarse_codes, result.codes), result.kept_start = _as_long(start[1]), True
        warnings.warn(
            f"distillation lowered the model's mean score of the held-out queries' top-{teacher.guard_k} "
            f"({result.guard['start']:.4f} -> {result.guard['distilled']:.4f}, standard error "
            f"{stderr:.4f}); the starting index is kept "
            "(a larger temperature may help: DistillConfig.temperature, poeem distill --temperature)",
            stacklevel=3,
        )


class _Teacher:
    """The exact ranking the index learns, the split of the queries, and the students' scores.

    ``g`` draws the query sample (``max_queries``) and the held-out queries first; training keeps
    drawing its batches from it.
    """

    def __init__(
        self,
        layer: PoeemLayer,
        items: torch.Tensor,
        queries: torch.Tensor,
        cfg: DistillConfig,
        g: torch.Generator,
    ) -> None:
        device = items.device
        if cfg.max_queries is not None and queries.shape[0] > cfg.max_queries:
            picked = torch.randperm(queries.shape[0], generator=g)[: cfg.max_queries]
            queries = queries[picked.sort().values.to(device)]
        self.layer, self.items, self.queries, self.cfg = layer, items, queries, cfg
        self.guard_k = cfg.guard_k or min(GUARD_K, items.shape[0])
        top_scores, self.top = FlatIndex(items, "ip").search(queries, cfg.teacher_k)  # (nq, teacher_k)
        order = torch.randperm(queries.shape[0], generator=g).to(device)
        held = min(int(cfg.holdout * queries.shape[0]), MAX_HELDOUT) if queries.shape[0] >= 20 else 0
        self.heldout, self.fit = order[:held], order[held:]
        first = self.fit[:1024]
        self.temperature = cfg.temperature or float(top_scores[first].std(dim=1).mean().clamp_min(1e-6))
        # items no query's top-k holds are scored too: training never sees them, so they can drift up
        sample = torch.randperm(items.shape[0], generator=torch.Generator().manual_seed(cfg.seed))
        self.random_items = sample[:GUARD_ITEMS].to(device)

    def scores(
        self, rows: torch.Tensor, codes: Codes, extra: torch.Tensor | None = None, with_lists: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """For the queries ``rows`` (B,) and their candidates (M: the union of their teacher
        top-k, and the ``extra`` items): the teacher's (B, M) exact scores, the code student's
        and, ``with_lists``, the list student's (else None, as without lists)."""
        layer, (coarse_codes, pq_codes) = self.layer, codes
        pool = self.top[rows].reshape(-1)
        cand = (pool if extra is None else torch.cat([pool, extra])).unique()
        q = self.queries[rows]
        qr = q @ layer.rotation_matrix
        lists = layer.coarse[coarse_codes[cand].long()] if layer.coarse is not None else None
        recon = pq_reconstruct(pq_codes[cand].long(), layer.codebooks, layer.config.dim)
        code = qr @ (recon if lists is None else recon + lists).T
        return q @ self.items[cand].T, code, (qr @ lists.T if with_lists and lists is not None else None)

    def losses(self, rows: torch.Tensor, codes: Codes) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The code and the list students' ListNet losses on the queries ``rows`` (the list
        student's None without lists or with list_weight 0: then it is not scored at all)."""
        teacher, code, lists = self.scores(rows, codes, with_lists=self.cfg.list_weight > 0)
        list_loss = listnet(teacher, lists, self.temperature) if lists is not None else None
        return listnet(teacher, code, self.temperature), list_loss

    @torch.no_grad()
    def heldout_loss(self, codes: Codes) -> float:
        """The held-out queries' code loss (in batches: a batch's pooled candidates stay small)."""
        parts = []
        for rows in self.batches(self.heldout):
            teacher, code, _ = self.scores(rows, codes)
            parts.append(float(listnet(teacher, code, self.temperature)) * rows.numel())
        return sum(parts) / self.heldout.numel()

    @torch.no_grad()
    def guard_scores(self, codes: Codes) -> torch.Tensor | None:
        """(held-out,) each held-out query's mean exact score of its code student's top-k items
        (among its candidates and the random items); None without held-out queries."""
        if not self.heldout.numel():
            return None
        means = []
        for rows in self.batches(self.heldout):
            teacher, code, _ = self.scores(rows, codes, self.random_items)
            means.append(teacher.gather(1, code.topk(self.guard_k, dim=1).indices).mean(dim=1))
        return torch.cat(means).cpu()

    def batches(self, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return rows.split(self.cfg.batch_size)


def _stage_steps(layer: PoeemLayer, codebooks: torch.Tensor) -> torch.Tensor | None:
    """(D, 1, 1) the share of Adam's step each residual-quantizer stage takes: the RMS of its
    starting ``codebooks`` (D, K, dim) over the first stage's. Later stages code ever smaller
    residuals, and Adam's steps do not scale with a parameter's size, so one learning rate would
    move them by a growing share of their size. None for PQ, whose subspaces are alike."""
    if layer.config.quantizer != "rq":
        return None
    rms = codebooks.detach().pow(2).mean(dim=(1, 2)).sqrt()
    return (rms / rms[0].clamp_min(1e-12)).clamp(max=1.0).view(-1, 1, 1)


def _next_step(step: int, history: list[dict[str, float]], best: Best | None, cfg: DistillConfig) -> int:
    """The schedule position (round * epochs + epoch) to run after ``step``: the next epoch; the
    next round's first when ``patience`` epochs in a row did not lower the round's own best
    held-out loss (a round starts from re-assigned codes, higher than the best so far, and gets
    its whole patience to improve on itself); the end (rounds * epochs) when the round that ended
    found no better loss than an earlier round."""
    total = cfg.rounds * cfg.epochs
    if cfg.patience is None or best is None:
        return step + 1
    round_no, epoch = divmod(step, cfg.epochs)
    losses = [row["heldout_code_loss"] for row in history if row["round"] == round_no]
    since = len(losses) - 1 - min(range(len(losses)), key=losses.__getitem__)  # epochs since its best
    if since < cfg.patience and epoch + 1 < cfg.epochs:
        return step + 1
    return total if int(best[2]["round"]) < round_no else min((round_no + 1) * cfg.epochs, total)


@torch.no_grad()
def _copy_into(params: list[torch.Tensor], values: list[torch.Tensor]) -> None:
    for p, value in zip(params, values, strict=True):
        p.copy_(value)


def _fingerprint(x: torch.Tensor) -> list[float]:
    """Shape and float64 sum of a tensor: enough to tell other inputs from the checkpoint's."""
    return [*map(float, x.shape), float(x.double().sum())]


def _save_state(
    path: Path,
    layer: PoeemLayer,
    optimizer: torch.optim.Optimizer,
    g: torch.Generator,
    done: int,
    history: list[dict[str, float]],
    best: Best | None,
    codes: Codes,
    inputs: dict[str, Any],
    start: Start,
) -> None:
    """Everything :func:`_restore` needs to continue after ``done`` epochs, in one file."""

    def own(x: torch.Tensor, current: torch.Tensor | None) -> torch.Tensor:
        return x.clone() if x is current else x  # the first round's codes are the start's (one file)

    (coarse_codes, pq_codes), (start_coarse, start_codes) = codes, start[1]
    extra = {"codes": pq_codes, "generator": g.get_state(), "start.codes": own(start_codes, pq_codes)}
    if coarse_codes is not None and start_coarse is not None:
        extra["coarse_codes"] = coarse_codes
        extra["start.coarse_codes"] = own(start_coarse, coarse_codes)
    state: dict[str, Any] = {"done": done, "history": history, "inputs": inputs}
    state |= {"start_guard": start[2] is not None, "best": None}
    if best is not None:
        extra.update({f"best.{i}": p for i, p in enumerate(best[1])})
        # the best epoch's codes: the current ones, the start's, or those of an earlier round
        prefix = "" if best[3] is codes else "start." if best[3] is start[1] else "best."
        if prefix == "best.":
            extra["best.codes"] = best[3][1]
            if best[3][0] is not None:
                extra["best.coarse_codes"] = best[3][0]
        state["best"] = {"loss": best[0], "row": best[2], "codes": prefix}
    extra.update({f"start.{i}": p for i, p in enumerate(start[0])})
    if start[2] is not None:
        extra["start.guard"] = start[2]
    save_checkpoint(path, layer, optimizer, {"distill": state}, extra)


def _restore(
    path: Path,
    layer: PoeemLayer,
    optimizer: torch.optim.Optimizer,
    g: torch.Generator,
    inputs: dict[str, Any],
    trained: list[torch.Tensor],
) -> tuple[int, list[dict[str, float]], Best | None, Codes, Start]:
    """Load a :func:`_save_state` file into ``layer``, ``optimizer`` and ``g``; returns the
    epochs done, the history, the best epoch so far, the items' current codes and the start."""
    tensors, meta = read_checkpoint(path)
    state = meta.get("trainer", {}).get("distill")
    if state is None:
        raise PoeemError("distill checkpoint", "a distillation checkpoint", f"'{path}'", "delete it")
    if "start_guard" not in state or "codes" not in (state["best"] or {"codes": ""}):
        # written by an older poeem: no starting index, no per-query guard, or no best epoch's codes
        raise PoeemError(
            "distill --resume",
            "a distillation state that holds its starting index",
            "a state written by an older poeem",
            f"delete '{path}' to start the distillation over",
        )
    if state["inputs"] != inputs:
        changed = sorted(k for k in inputs if state["inputs"].get(k) != inputs[k])
        raise PoeemError(
            "distill --resume",
            "the stopped distillation's own items, queries and settings",
            f"other {', '.join(changed)}",
            f"pass the same ones, or delete '{path}' to start over",
        )
    restore_checkpoint(path, tensors, meta, layer, optimizer, layer.codebooks.device)
    g.set_state(tensors["extra.generator"])
    device = layer.codebooks.device

    def codes_of(prefix: str) -> Codes:
        coarse = tensors.get(f"extra.{prefix}coarse_codes")
        return (None if coarse is None else coarse.to(device)), tensors[f"extra.{prefix}codes"].to(device)

    codes = {prefix: codes_of(prefix) for prefix in ("", "start.")}  # one object each, as when saved
    best = None
    if state["best"] is not None:
        kept = [tensors[f"extra.best.{i}"].to(p.device) for i, p in enumerate(trained)]
        prefix = state["best"]["codes"]
        best_codes = codes[prefix] if prefix in codes else codes_of(prefix)
        best = (state["best"]["loss"], kept, state["best"]["row"], best_codes)
    start_params = [tensors[f"extra.start.{i}"].to(p.device) for i, p in enumerate(trained)]
    start = (start_params, codes["start."], tensors.get("extra.start.guard"))
    return state["done"], state["history"], best, codes[""], start


def _as_long(codes: Codes) -> Codes:
    """The codes as the int64 tensors :class:`DistillResult` holds."""
    coarse, pq = codes
    return (None if coarse is None else coarse.long()), pq.long()


def _check_inputs(layer: PoeemLayer, items: torch.Tensor, queries: torch.Tensor, cfg: DistillConfig) -> None:
    if not layer.is_initialized:
        raise PoeemError(
            "distill",
            "an initialized index",
            "a layer still in its warm start",
            "call layer.initialize(items)",
        )
    dim = layer.config.dim
    for what, x in (("items", items), ("queries", queries)):
        if x.dim() != 2 or x.shape[1] != dim:
            raise PoeemError(
                f"distill {what}", f"shape (n, {dim})", f"shape {tuple(x.shape)}", f"pass {dim}-dim vectors"
            )
        if not bool(torch.isfinite(x).all()):
            raise PoeemError(f"distill {what}", "finite values", "NaN or inf", "check the embeddings")
    if cfg.guard_k is not None and cfg.guard_k > min(items.shape[0], GUARD_ITEMS):
        raise PoeemError(
            "distill.guard_k",
            f"at most {min(items.shape[0], GUARD_ITEMS)} (the items, and the guard's random items)",
            str(cfg.guard_k),
            "lower --guard-k",
        )
    if items.shape[0] < cfg.teacher_k:
        raise PoeemError(
            "distill.teacher_k",
            f"at most the {items.shape[0]} items",
            str(cfg.teacher_k),
            "lower --teacher-k",
        )
    if queries.shape[0] == 0:
        raise PoeemError("distill queries", "at least one query", "none", "pass query embeddings")
