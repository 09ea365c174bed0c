"""The ``poeem`` command line: demo, train, evaluate, export, distill, embed, search, add,
remove, compact, serve."""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import typer

from poeem.cli_options import distill_options, given_settings, with_settings
from poeem.errors import PoeemError
from poeem.pipeline.config import run_options
from poeem.user_files import read_array, read_ids, read_new_ids, require_file

if TYPE_CHECKING:
    from poeem.ids import IdMap

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Joint training of a retrieval model and its PQ index (Poeem), and FAISS export.",
)


@app.command()
def demo(
    epochs: Annotated[int, typer.Option(help="Epochs for each model (the tutorial used 3).")] = 3,
    batch_size: Annotated[int, typer.Option(help="Training batch size.")] = 256,
    num_pairs: Annotated[int, typer.Option(help="Synthetic training pairs.")] = 1_000_000,
    out: Annotated[Path, typer.Option(help="Folder for both runs.")] = Path("runs/demo"),
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    progress: Annotated[
        bool, typer.Option("--progress/--no-progress", help="Progress bars (shown only on a terminal).")
    ] = True,
) -> None:
    """The main job: baseline vs Poeem on the tutorial's synthetic task, one comparison table.

    Running it again replaces the runs of the previous demo in --out."""
    from poeem.demo import run_demo

    run_demo(epochs=epochs, batch_size=batch_size, num_pairs=num_pairs, out=out, seed=seed, progress=progress)


Opt = typer.Option
AsTrained = Annotated[  # poeem evaluate / export --as-trained
    bool,
    Opt(
        help="A run trained with --refit rq or pq: its index as training left it (PQ codes, the "
        "paper's index), not the refit it serves."
    ),
]
FastScanOpt = Opt(  # poeem export / distill --fast-scan
    "--fast-scan/--no-fast-scan",
    help="4-bit fast-scan FAISS index. Default: fast scan exactly when the codes are PQ with K=16 "
    "(the layer's default).",
    show_default=False,
)
RerankOpt = Opt(  # poeem export / distill --rerank
    "--rerank",
    help="fp16 | sq8 | float: also keep each item's final embedding at this precision (2, 1 or 4 "
    "bytes per dimension beside the codes), so that searches re-score the codes' top candidates "
    "exactly (poeem search --rerank-factor). Default: codes only.",
    show_default=False,
)


def train(
    run_dir: Annotated[Path, Opt(help="Folder for config, checkpoints, weights, metrics.")] = Path(
        "runs/latest"
    ),
    config: Annotated[Path | None, Opt(help="A .json or .toml RunConfig; flags override it.")] = None,
    resume: Annotated[bool, Opt(help="Continue the run in --run-dir from its checkpoint.")] = False,
    poeem: Annotated[
        bool | None,
        Opt(
            "--poeem/--no-poeem", help="End the item tower with a Poeem layer.", rich_help_panel="Index layer"
        ),
    ] = None,
    nproc: Annotated[
        int,
        Opt(
            help="Processes on this machine: relaunches through torchrun (--batch-size is the global "
            "batch). For several machines call torchrun yourself (docs/distributed.md).",
            rich_help_panel="Training",
        ),
    ] = 1,
    **settings: Any,
) -> None:
    """Train a two-tower model (with or without the Poeem layer), then evaluate it.

    Flags override --config. Every other setting goes in the config file, a .toml or .json
    RunConfig with the sections data, model (the layer under model.poeem), train and eval.
    With --resume, only the flags marked safe may change; the rest is refused.
    """
    from poeem import distributed, launch
    from poeem.evaluation.format import format_rows
    from poeem.pipeline import RunConfig, resume_config, train_run

    if nproc < 1:
        raise PoeemError("--nproc", "a positive integer", str(nproc), "pass 1 or more")
    if nproc > 1 and not distributed.launched_by_torchrun():
        code = launch.relaunch_with_torchrun(nproc)
        if code:
            raise typer.Exit(code)
        return
    main_rank = os.environ.get("RANK", "0") == "0"

    given = given_settings(settings, run_options())
    overrides = {section: given.get(section, {}) for section in ("data", "model", "train", "eval")}
    layer, text = given.get("model.poeem", {}), given.get("model.text", {})
    dim = overrides["model"].get("dim")
    data = overrides["data"].get("kind")
    if resume:
        if config is not None:
            raise PoeemError(
                "--resume",
                "the run's stored config",
                "--config",
                "drop it: a resumed run keeps its config.json; pass changed settings as flags",
            )
        cfg, applied = resume_config(run_dir, overrides, layer, text, poeem)
        for line in applied if main_rank else []:
            typer.echo(f"resume: {line}")
    else:
        if data is None and config is None:
            typer.echo(
                "no --data given: training on the built-in synthetic task "
                "(--data movielens | lightgcn | table | beir with --data-path for real data)"
            )
        raw = RunConfig.from_file(config).to_dict() if config else RunConfig().to_dict()
        for section, values in overrides.items():
            raw[section].update(values)
        if poeem is False:
            raw["model"]["poeem"] = None
        elif poeem or layer:
            raw["model"]["poeem"] = {**(raw["model"].get("poeem") or {}), **layer}
        if text or (raw["data"]["kind"] == "beir" and raw["model"].get("text") is None):
            raw["model"]["text"] = {**(raw["model"].get("text") or {}), **text}
            if dim is None and config is None:  # text towers keep the encoder's size by default
                raw["model"]["dim"] = _text_encoder_dim(raw["model"]["text"])
            from poeem.model.config import TextConfig

            shown = TextConfig(**raw["model"]["text"])
            typer.echo(f"text towers: {shown.encoder}, mode {shown.mode}, dim {raw['model']['dim']}")
        cfg = RunConfig.from_dict(raw)
    _, metrics = train_run(cfg, run_dir, resume)
    if metrics:  # rank 0
        _echo_index_stages(metrics)
        if metrics["rows"] or cfg.eval.after_training:
            typer.echo(format_rows(metrics["rows"]))
        else:
            typer.echo(f"not evaluated (--no-final-eval): 'poeem evaluate {run_dir}' evaluates it")
        typer.echo(f"run folder: {run_dir}")


app.command()(with_settings(train, run_options()))


def _echo_index_stages(metrics: dict[str, Any]) -> None:
    """Say what a finished run did to its index after training: a fit, a refit, a distillation."""
    from poeem.pipeline.run import after_training_seconds

    if "fit" in metrics:
        f, spent = metrics["fit"], after_training_seconds(metrics)
        share = spent / max(spent + metrics["train_s"], 1e-9)
        typer.echo(
            f"the towers trained alone in {metrics['train_s']:.1f}s; the index was fitted on "
            f"{f['items']} items in {f['seconds']:.1f}s and built in {spent:.1f}s in all "
            f"({share:.0%} of the run)"
        )
    if "refit" in metrics:
        r = metrics["refit"]
        typer.echo(f"index refitted after training ({r['quantizer']}) in {r['seconds']:.1f}s")
    if "distill" in metrics:
        d = metrics["distill"]
        kept = (
            "kept the trained index: the model scored the distilled one's top-k lower on held-out queries"
            if d["kept_start"]
            else f"kept round {d['best']['round']} epoch {d['best']['epoch']}"
        )
        typer.echo(
            f"index distilled after training: {d['epochs']} epochs in {d['seconds']:.1f}s, {kept} "
            "(the rows below are the index kept)"
        )


def _text_encoder_dim(text: dict[str, Any]) -> int:
    """The embedding size of the configured text encoder: text towers default to it."""
    from poeem.model.config import TextConfig
    from poeem.model.text import encoder_dim, load_encoder

    cfg = TextConfig(**text)
    return encoder_dim(load_encoder(cfg.encoder, cfg.max_seq_length))


@app.command()
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="A folder written by 'poeem train'.")],
    nprobe: Annotated[list[int] | None, typer.Option(help="IVF lists to probe; repeat for several.")] = None,
    lists_ceiling: Annotated[
        bool,
        typer.Option(
            help="Also search the learned lists with the float item vectors in place of codes "
            "(poeem-lists-flat): what perfect codes would reach at each nprobe. Far below exact: "
            "the lists lose it (probe more, or train the routing); close to poeem: more bytes "
            "will not help much."
        ),
    ] = False,
    as_trained: AsTrained = False,
) -> None:
    """Evaluate a trained run: exact search, the learned index, and a FAISS IVF-PQ baseline."""
    from dataclasses import replace

    from poeem.data import load_data
    from poeem.evaluation.format import format_rows
    from poeem.pipeline import EvalConfig, attach_data, evaluate_model, load_run

    given = {"nprobes": tuple(nprobe)} if nprobe else {}
    EvalConfig(**given)  # a bad --nprobe fails before the run loads
    cfg, model = load_run(run_dir, as_trained=as_trained)
    cfg.eval = replace(cfg.eval, **given, lists_ceiling=cfg.eval.lists_ceiling or lists_ceiling)
    data = load_data(cfg.data)
    rows = evaluate_model(attach_data(model, data), data, cfg)
    typer.echo(format_rows(rows))


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="A folder written by 'poeem train' with a Poeem layer.")],
    out: Annotated[Path, typer.Option(help="The index directory to create.")],
    fast_scan: Annotated[bool | None, FastScanOpt] = None,
    replace: Annotated[
        bool,
        typer.Option(
            help="--out holds an index: publish this export as its next version (servers pick it up "
            "by polling or POST /reload; readers of the old version are not disturbed)."
        ),
    ] = False,
    from_training: Annotated[
        str,
        typer.Option(
            help="lists | codes | none: what each item reuses from its latest training step. 'lists' "
            "keeps its list and encodes only its residual (skips the list search; as good as "
            "encoding from scratch in docs/benchmarks.md); 'codes' keeps its codes (the index as "
            "trained: no pass over the items, codes up to an epoch old); 'none' encodes every "
            "item from scratch. Items never coded in training are encoded."
        ),
    ] = "lists",
    as_trained: AsTrained = False,
    rerank: Annotated[str | None, RerankOpt] = None,
) -> None:
    """Export the learned index of a run into a FAISS index directory, with no training.

    Under torchrun each process encodes its share of the items; rank 0 writes the index."""
    import time

    from poeem.pipeline import export_run
    from poeem.pipeline.recipe import IndexRecipe

    started = time.perf_counter()
    recipe = IndexRecipe(
        start="as-trained" if as_trained else "trained",
        from_training=None if from_training == "none" else from_training,  # type: ignore[arg-type]
        rerank=rerank,  # type: ignore[arg-type]
    )
    searcher = export_run(run_dir, out, fast_scan, replace, recipe=recipe)
    if searcher is None:  # not rank 0 under torchrun
        return
    typer.echo(
        f"exported {searcher.ntotal} items ({searcher.describe()}, metric {searcher.metric}) "
        f"to {out} (version {searcher.version}) in {time.perf_counter() - started:.2f}s"
    )


def distill(
    run_dir: Annotated[
        Path | None, typer.Argument(help="A folder written by 'poeem train' (or use --items and --queries).")
    ] = None,
    out: Annotated[Path, typer.Option(help="The index directory to write.")] = Path("index/distilled"),
    items: Annotated[Path | None, typer.Option(help="Any (n, dim) item embeddings as .npy.")] = None,
    queries: Annotated[
        Path | None,
        typer.Option(help="(nq, dim) .npy query embeddings like those the index will serve; no labels."),
    ] = None,
    ids: Annotated[
        Path | None,
        typer.Option(help="With --items: the n item ids, as .npy or one per line (default: rows)."),
    ] = None,
    metric: Annotated[str, typer.Option(help="With --items: ip | cosine (--from-faiss: the file's).")] = "ip",
    from_faiss: Annotated[
        Path | None,
        typer.Option(
            help="With --items: start from this FAISS IVF-PQ/PQ (OPQ included) or IVF-RQ/RQ file's "
            "quantizer instead of fitting one; only --rotation givens or cayley may be added (PQ files)."
        ),
    ] = None,
    refit: Annotated[
        str | None,
        typer.Option(
            help="With RUN_DIR (a run with a layer): distil a refit of its layer, its trained lists "
            "with a residual coder fitted on the final items: rq (residual quantizer, same bytes) | pq."
        ),
    ] = None,
    fast_scan: Annotated[bool | None, FastScanOpt] = None,
    rerank: Annotated[str | None, RerankOpt] = None,
    replace: Annotated[
        bool, typer.Option(help="--out holds an index: publish this one as its next version.")
    ] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bars.")] = True,
    resume: Annotated[
        bool,
        typer.Option(
            help="Continue a stopped distillation for --out from its state file (OUT.distill.safetensors)."
        ),
    ] = False,
    **settings: Any,
) -> None:
    """Distil an index from a model's own ranking: the exact top-k of each query teaches the
    coarse centroids, codebooks and rotation (ListNet), with no labels and no model training.

    For a run (its training queries are the teacher's; a run without a Poeem layer needs the
    layer flags), or for any embeddings with --items and --queries."""
    from poeem.training.distill import DistillConfig

    given = given_settings(settings, distill_options())
    config = DistillConfig(**given.get("distill", {}))
    settings = given.get("layer", {})
    if (run_dir is None) == (items is None):
        raise PoeemError("distill", "a RUN_DIR or --items (one of them)", "both or neither", "pass one")
    if run_dir is not None:
        from poeem.pipeline import export_run

        recipe = _run_recipe(
            refit, settings, config, {"--queries": queries, "--ids": ids, "--from-faiss": from_faiss}, rerank
        )
        searcher = export_run(run_dir, out, fast_scan, replace, recipe=recipe, resume=resume)
        assert searcher is not None
    else:
        from poeem.pipeline.distill import distill_embeddings

        assert items is not None
        if refit is not None:
            raise PoeemError(
                "--refit",
                "a RUN_DIR (a trained layer's lists)",
                "--items",
                "use --quantizer rq to fit a new index",
            )
        if queries is None:
            raise PoeemError("distill", "--queries with --items", "no --queries", "pass --queries FILE.npy")
        x, q = read_array(items, "item embeddings"), read_array(queries, "query embeddings")
        item_ids = read_new_ids(ids) if ids is not None else None
        if item_ids is not None and len(item_ids) != len(x):
            raise PoeemError("--ids", f"one id per item ({len(x)})", f"{len(item_ids)} ids", "align them")
        if "num_subspaces" not in settings and from_faiss is None:
            raise PoeemError(
                "distill",
                "--num-subspaces with --items",
                "none",
                "pass e.g. --num-subspaces 8 (8 bytes per item at K=256)",
            )
        flags = (config, fast_scan, replace, progress, from_faiss, resume, rerank)
        searcher, _ = distill_embeddings(x, q, out, settings, metric, item_ids, *flags)  # type: ignore[arg-type]
    typer.echo(f"distilled index of {searcher.ntotal} items ({searcher.describe()}) written to {out}")


app.command()(with_settings(distill, distill_options()))


def _run_recipe(
    refit: str | None,
    settings: dict[str, Any],
    config: Any,
    items_only: dict[str, Any],
    rerank: str | None = None,
) -> Any:
    """The recipe ``poeem distill RUN_DIR`` builds by: a refit of the run's layer (``--refit``), a
    new layer (layer flags, for a run without one) or the run's own layer, distilled by
    ``config``; flags that only go with ``--items`` are refused."""
    from poeem.pipeline.recipe import IndexRecipe

    for flag, value in items_only.items():
        if value is not None:
            raise PoeemError(
                flag, "--items (embeddings of your own)", "a RUN_DIR", f"drop {flag}: a run has its own"
            )
    if refit is not None and settings:
        raise PoeemError(
            "--refit",
            "no layer flags: a refit keeps the shape of the run's trained layer",
            f"layer flags {sorted(settings)}",
            "drop the layer flags, or drop --refit to fit a new index on a run without a layer",
        )
    start = "refit" if refit is not None else "fit" if settings else "trained"
    return IndexRecipe(start=start, refit=refit, layer=settings, distill=config, rerank=rerank)  # type: ignore[arg-type]


@app.command()
def embed(
    run_dir: Annotated[Path, typer.Argument(help="A folder written by 'poeem train'.")],
    ids: Annotated[Path, typer.Option(help="Item ids (the data's own), as .npy or one per line.")],
    out: Annotated[Path, typer.Option(help="Where to write the (n, dim) embeddings (.npy).")],
    item_features: Annotated[
        Path | None,
        typer.Option(help="(n, F) .npy features of these items (default: the features saved with the run)."),
    ] = None,
    mean: Annotated[
        bool,
        typer.Option(
            help="Write one row, the mean of the items' embeddings: a cold-start embedding for a new "
            "item made of similar ones."
        ),
    ] = False,
) -> None:
    """Embed items with a run's item tower: the (n, dim) .npy that 'poeem add --items' takes."""
    from poeem.pipeline.embed import embed_items
    from poeem.storage import atomic_write

    if out.suffix != ".npy":
        raise PoeemError("--out", "a .npy file name", f"'{out}'", "name it like items.npy")
    feats = read_array(item_features, "item features") if item_features is not None else None
    x = embed_items(run_dir, read_ids(ids, _run_item_keys(run_dir)), feats)
    if mean:
        x = x.mean(axis=0, keepdims=True)

    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:  # a file object: np.save would add .npy to the temporary name
            np.save(f, x)

    atomic_write(out, write)
    typer.echo(f"wrote {x.shape[0]} item embeddings of size {x.shape[1]} to {out}")


def _run_item_keys(run_dir: Path) -> IdMap | None:
    from poeem.pipeline.run_dir import read_artifacts

    return read_artifacts(run_dir).item_keys


@app.command()
def search(
    index_dir: Annotated[Path, typer.Argument(help="A folder written by 'poeem export'.")],
    query_file: Annotated[
        Path | None, typer.Option(help="(nq, dim) embeddings as .npy, or query ids (.txt/.csv).")
    ] = None,
    query: Annotated[
        list[str] | None, typer.Option(help="A query text (indexes of text models); repeat for several.")
    ] = None,
    query_features: Annotated[
        Path | None,
        typer.Option(help="(nq, F) .npy features of the query ids (default: the features saved at export)."),
    ] = None,
    exclude: Annotated[
        Path | None,
        typer.Option(
            help="Pairs 'query,item' (comma, tab or space separated, e.g. the training interactions) "
            "whose items are left out of that query's results."
        ),
    ] = None,
    k: Annotated[int, typer.Option("-k", "--k", help="Results per query.")] = 10,
    nprobe: Annotated[int, typer.Option(help="IVF lists to probe.")] = 1,
    backend: Annotated[str, typer.Option(help="faiss | torch")] = "faiss",
    out: Annotated[Path | None, typer.Option(help="Write results as CSV here (default: stdout).")] = None,
    batch_size: Annotated[int, typer.Option(help="Queries searched and written at a time.")] = 4096,
    rerank_factor: Annotated[
        float | None,
        typer.Option(
            help="F: re-score the codes' top F*k candidates with the items' stored vectors and keep the "
            "best k (an index exported with --rerank); 0 or 1: off. Default: 2 on an index with "
            "stored vectors, off on one without.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Search an index directory; prints CSV rows query,rank,id,score in the data's own ids.

    The query column is the query id, or the row number of a .npy embedding or --query text.
    A query whose probed lists hold fewer than k items gets fewer rows, with a warning."""
    import warnings

    from poeem.metric import check_search_args
    from poeem.search.searcher import Searcher, found
    from poeem.storage import atomic_write
    from poeem.user_files import read_pairs

    check_search_args(k, nprobe)  # before any output
    if (query_file is None) == (not query):
        raise PoeemError("search", "--query-file or --query (one of them)", "both or neither", "pass one")
    searcher = Searcher.load(index_dir, backend=backend)  # type: ignore[arg-type]
    searcher.rerank_factor(rerank_factor)  # a factor the index cannot use fails before any output
    encoder = searcher.queries
    by_embedding = query_file is None or query_file.suffix == ".npy"
    if query:
        queries = encoder.by_texts(query).numpy()
        names = np.arange(len(queries))
    elif query_file is not None and by_embedding:
        queries: np.ndarray = read_array(query_file, "query embeddings")
        names: np.ndarray = np.arange(len(queries))
    else:
        assert query_file is not None
        names = read_ids(query_file, encoder.keys)
        encoder.rows(names)  # unknown ids fail here, before any output
        queries = names
    feats = read_array(query_features, "query features") if query_features is not None else None
    if feats is not None and (by_embedding or len(feats) != len(names)):
        raise PoeemError(
            "--query-features",
            f"{len(names)} rows, with query ids",
            f"{len(feats)} rows",
            "pass one feature row per query id",
        )
    seen = read_pairs(exclude, "--exclude file") if exclude is not None else None
    wanted = min(k, searcher.ntotal)
    written, short, fewest = 0, 0, wanted

    def write_rows(stream: Any) -> None:
        nonlocal written, short, fewest
        stream.write("query,rank,id,score\n")
        for start in range(0, len(names), batch_size):
            part = slice(start, start + batch_size)
            xq = (
                queries[part]
                if by_embedding
                else encoder.by_ids(queries[part], feats[part] if feats is not None else None)
            )
            skip = [seen.get(str(name), ()) for name in names[part].tolist()] if seen is not None else None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # k and nprobe clamps: the summary below says it
                d, i = searcher.search(xq, k, nprobe, exclude=skip, rerank=rerank_factor)
            for name, scores, ids, hits in zip(names[part].tolist(), d, i, found(i), strict=True):
                rows = zip(ids[hits].tolist(), scores[hits].tolist(), strict=True)
                stream.write(
                    "".join(f"{name},{r},{item},{score:.6g}\n" for r, (item, score) in enumerate(rows, 1))
                )
                written += int(hits.sum())
                if hits.sum() < wanted:
                    short, fewest = short + 1, min(fewest, int(hits.sum()))

    if out is None:
        write_rows(sys.stdout)
    else:

        def to_file(tmp: Path) -> None:
            with tmp.open("w") as f:
                write_rows(f)

        atomic_write(out, to_file)
        typer.echo(f"wrote {written} results to {out}")
    if k > searcher.ntotal:
        warnings.warn(f"k={k} is larger than the {searcher.ntotal} items in the index", stacklevel=1)
    if short:
        hint = (
            f"pass a larger --nprobe (now {min(nprobe, searcher.nlist)} of {searcher.nlist} lists)"
            if nprobe < searcher.nlist
            else "every list was probed: the index holds fewer items than asked for"
        )
        warnings.warn(
            f"{short} of {len(names)} queries got fewer than {wanted} results (fewest: {fewest}), "
            f"because the lists they probe hold too few items{' after --exclude' if seen else ''}; {hint}",
            stacklevel=1,
        )


@app.command()
def add(
    index_dir: Annotated[Path, typer.Argument(help="A folder written by 'poeem export'.")],
    items: Annotated[Path | None, typer.Option(help="(n, dim) item embeddings as .npy.")] = None,
    texts: Annotated[
        Path | None,
        typer.Option(
            help="Documents to add by text (indexes of text models): a .jsonl of "
            '{"_id", "title", "text"} objects, like a BEIR corpus.'
        ),
    ] = None,
    ids: Annotated[
        Path | None,
        typer.Option(
            help="n item ids (the data's own), as .npy or one per line (default with --texts: _id)."
        ),
    ] = None,
) -> None:
    """Add items, coded with the frozen codebooks (no retraining); saved atomically as a new segment."""
    from poeem.search.searcher import Searcher

    if (items is None) == (texts is None):
        raise PoeemError("add", "--items or --texts (one of them)", "both or neither", "pass one")
    searcher = Searcher.load(index_dir)
    if texts is not None:
        from poeem.data.beir import read_documents

        doc_ids, doc_texts = read_documents(require_file(texts, "--texts file"))
        embeddings = searcher.embed_item_texts(doc_texts)
        new_ids = read_ids(ids, searcher.item_keys) if ids is not None else np.array(doc_ids)
    else:
        assert items is not None
        if ids is None:
            raise PoeemError("add", "--ids with --items", "no --ids", "pass --ids FILE (one id per item)")
        embeddings, new_ids = read_array(items, "item embeddings"), read_ids(ids, searcher.item_keys)
    searcher.add(embeddings, new_ids)
    typer.echo(f"index now holds {searcher.ntotal} items (version {searcher.version})")


@app.command()
def remove(
    index_dir: Annotated[Path, typer.Argument(help="A folder written by 'poeem export'.")],
    ids: Annotated[Path, typer.Option(help="Item ids to remove, as .npy or one per line.")],
) -> None:
    """Remove items by id; saved atomically."""
    from poeem.search.searcher import Searcher

    searcher = Searcher.load(index_dir)
    removed = searcher.remove(read_ids(ids, searcher.item_keys))
    typer.echo(f"removed {removed} items; index now holds {searcher.ntotal} (version {searcher.version})")


@app.command()
def compact(
    index_dir: Annotated[Path, typer.Argument(help="A folder written by 'poeem export'.")],
) -> None:
    """Fold the segments of added items and the removed ids into a new base index, saved
    atomically. Updates run it themselves once segments hold a tenth of the index."""
    from poeem.search.searcher import Searcher

    searcher = Searcher.load(index_dir)
    segments, removed = len(searcher.index.segments), int(searcher.index.removed.numel())
    searcher.compact()
    typer.echo(
        f"merged {segments} segments and {removed} removed ids: {searcher.ntotal} items "
        f"(version {searcher.version})"
    )


@app.command()
def serve(
    index_dir: Annotated[Path, typer.Argument(help="A folder written by 'poeem export'.")],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    workers: Annotated[int, typer.Option(help="Server processes (each loads the index).")] = 1,
    backend: Annotated[str, typer.Option(help="faiss | torch")] = "faiss",
    token_file: Annotated[
        Path | None,
        typer.Option(
            help="File holding the bearer token of the write endpoints (or set POEEM_TOKEN); "
            "without a token they are off."
        ),
    ] = None,
    max_k: Annotated[int, typer.Option(help="Largest k a request may ask for.")] = 1000,
    max_batch: Annotated[int, typer.Option(help="Most queries (or items) per request.")] = 1024,
    max_body_mb: Annotated[float, typer.Option(help="Largest request body, in MiB.")] = 8.0,
    poll_s: Annotated[
        float, typer.Option(help="Seconds between checks for a newer index version (0: off).")
    ] = 2.0,
    search_threads: Annotated[
        int, typer.Option(help="FAISS/torch threads inside one search; requests already run concurrently.")
    ] = 1,
    max_exclude: Annotated[
        int, typer.Option(help="Most ids one query may exclude (each widens that query's search).")
    ] = 10_000,
    max_nprobe: Annotated[
        int, typer.Option(help="Larger nprobe values of a request are clamped to this.")
    ] = 256,
    max_rerank_candidates: Annotated[
        int, typer.Option(help="Most candidates (rerank factor times k) one query may re-score.")
    ] = 10_000,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve an index directory over HTTP: POST /search, /items, /reload; GET /health, /ready,
    /info, /metrics; the API documentation is at /docs."""
    import importlib.util

    if importlib.util.find_spec("uvicorn") is None or importlib.util.find_spec("fastapi") is None:
        raise PoeemError(
            "poeem serve", "uvicorn and fastapi installed", "missing", "pip install 'poeem[serve]'"
        )

    from poeem.export.index_dir import read_manifest
    from poeem.serve.app import NEW_TOKEN, TOKEN_ENV, ServeConfig, run_server

    read_manifest(index_dir)  # a clear error now, before any worker starts
    token = os.environ.get(TOKEN_ENV)
    token = token.strip() if token is not None else None  # like --token-file: no trailing newline
    if token_file is not None:
        raw = require_file(token_file, "token file").read_bytes()
        try:
            token = raw.decode("ascii").strip()
        except UnicodeDecodeError:
            raise PoeemError(
                "token file",
                "a token of printable ASCII characters",
                f"'{token_file}' with a non-ASCII byte",
                f"write a new token into it, e.g. {NEW_TOKEN}",
            ) from None
    if workers < 1:
        raise PoeemError("--workers", "at least 1", str(workers), "pass --workers 1 (or one per core)")
    if not 0 < max_body_mb < 1 << 20:  # NaN too
        raise PoeemError(
            "--max-body-mb", "a size in MiB above 0", str(max_body_mb), "pass e.g. --max-body-mb 8"
        )
    config = ServeConfig(
        str(index_dir.resolve()),
        backend,
        max_k,
        max_batch,
        int(max_body_mb * (1 << 20)),
        token,
        poll_s,
        search_threads,
        max_exclude,
        max_nprobe,
        max_rerank_candidates,
    )
    banner = f"serving {index_dir} on http://{host}:{port} (writes {'on' if token else 'off'}); docs at /docs"
    run_server(config, host, port, workers, log_level, banner)


def main() -> None:
    """Entry point: bad input ends with one clear line on stderr and exit code 2."""
    import warnings

    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"
    from poeem import distributed
    from poeem.launch import report

    finished = False
    try:
        app()
        finished = True
    except SystemExit as done:
        finished = not done.code
        raise
    except PoeemError as err:
        report(f"error: {err}")
        sys.exit(2)
    except KeyboardInterrupt:
        report("interrupted (checkpoints written so far are intact)")
        sys.exit(130)
    finally:
        gc.collect()  # a model of sharded tables goes while its process group is still there
        if finished:  # ranks leave together: gloo may abort a rank that quits while others work
            distributed.barrier()
        distributed.teardown()


if __name__ == "__main__":
    main()
