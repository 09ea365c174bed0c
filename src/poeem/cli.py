"""The ``poeem`` command line: demo, train, evaluate, export, search, add, remove."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from poeem.errors import PoeemError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Joint training of a retrieval model and its PQ index (Poeem), and FAISS export.",
)


def _overrides(section: dict[str, Any], **values: Any) -> None:
    section.update({k: v for k, v in values.items() if v is not None})


@app.command()
def demo(
    epochs: Annotated[int, typer.Option(help="Epochs for each model (the tutorial used 3).")] = 3,
    batch_size: Annotated[int, typer.Option(help="Training batch size.")] = 256,
    num_pairs: Annotated[int, typer.Option(help="Synthetic training pairs.")] = 1_000_000,
    out: Annotated[Path, typer.Option(help="Folder for both runs.")] = Path("runs/demo"),
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """The main job: baseline vs Poeem on the tutorial's synthetic task, one comparison table."""
    from poeem.demo import run_demo

    run_demo(epochs=epochs, batch_size=batch_size, num_pairs=num_pairs, out=out, seed=seed)


@app.command()
def train(
    run_dir: Annotated[Path, typer.Option(help="Folder for config, checkpoints, weights, metrics.")] = Path(
        "runs/latest"
    ),
    config: Annotated[
        Path | None, typer.Option(help="A .json or .toml RunConfig; flags override it.")
    ] = None,
    data: Annotated[str | None, typer.Option(help="synthetic | movielens | lightgcn | table")] = None,
    data_path: Annotated[str | None, typer.Option(help="File or folder of the data.")] = None,
    poeem: Annotated[
        bool | None, typer.Option("--poeem/--no-poeem", help="End the item tower with a Poeem layer.")
    ] = None,
    num_coarse: Annotated[int | None, typer.Option(help="coarse_K (IVF lists), 0 = none.")] = None,
    num_subspaces: Annotated[int | None, typer.Option(help="D, PQ subvectors.")] = None,
    codebook_size: Annotated[int | None, typer.Option(help="K, codewords per subspace.")] = None,
    rotation: Annotated[str | None, typer.Option(help="none | opq | givens")] = None,
    warmup_steps: Annotated[int | None, typer.Option(help="Steps before the index starts.")] = None,
    buffer_size: Annotated[int | None, typer.Option(help="Item embeddings for k-means.")] = None,
    dim: Annotated[int | None, typer.Option(help="Embedding size.")] = None,
    temperature: Annotated[float | None, typer.Option(help="Softmax temperature.")] = None,
    random_negatives: Annotated[
        int | None, typer.Option(help="Uniform negatives added to each batch.")
    ] = None,
    logq: Annotated[bool | None, typer.Option("--logq/--no-logq", help="logQ popularity correction.")] = None,
    epochs: Annotated[int | None, typer.Option()] = None,
    batch_size: Annotated[int | None, typer.Option()] = None,
    lr: Annotated[float | None, typer.Option()] = None,
    index_lr: Annotated[float | None, typer.Option(help="Learning rate of the index parameters.")] = None,
    optimizer: Annotated[str | None, typer.Option(help="adam | adamw | adagrad")] = None,
    device: Annotated[str | None, typer.Option(help="cpu | cuda | auto")] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    checkpoint_every: Annotated[int | None, typer.Option(help="Steps between checkpoints.")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many steps.")] = None,
    log: Annotated[str | None, typer.Option(help="csv | tensorboard | none")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --run-dir from its checkpoint.")] = False,
) -> None:
    """Train a two-tower model (with or without the Poeem layer), then evaluate it."""
    from poeem.runs import RunConfig
    from poeem.training.run import train_run

    raw = RunConfig.from_file(config).to_dict() if config else RunConfig().to_dict()
    _overrides(raw["data"], kind=data, path=data_path, seed=seed)
    _overrides(
        raw["model"],
        dim=dim,
        temperature=temperature,
        random_negatives=random_negatives,
        logq_correction=logq,
    )
    _overrides(
        raw["train"],
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        index_lr=index_lr,
        optimizer=optimizer,
        device=device,
        seed=seed,
        checkpoint_every=checkpoint_every,
        max_steps=max_steps,
        log=log,
    )
    if poeem is False:
        raw["model"]["poeem"] = None
    elif poeem or any(
        v is not None for v in (num_coarse, num_subspaces, codebook_size, rotation, warmup_steps, buffer_size)
    ):
        raw["model"]["poeem"] = raw["model"].get("poeem") or {}
        _overrides(
            raw["model"]["poeem"],
            num_coarse=num_coarse,
            num_subspaces=num_subspaces,
            codebook_size=codebook_size,
            rotation=rotation,
            warmup_steps=warmup_steps,
            buffer_size=buffer_size,
        )
    _, metrics = train_run(RunConfig.from_dict(raw), run_dir, resume)
    from poeem.evaluation.table import format_rows

    typer.echo(format_rows(metrics["rows"]))
    typer.echo(f"run folder: {run_dir}")


@app.command()
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="A folder written by 'poeem train'.")],
    nprobe: Annotated[list[int] | None, typer.Option(help="IVF lists to probe; repeat for several.")] = None,
) -> None:
    """Evaluate a trained run: exact search, the learned index, and a FAISS IVF-PQ baseline."""
    from poeem.data import load_data
    from poeem.evaluation.table import format_rows
    from poeem.runs import load_run
    from poeem.training.run import evaluate_model

    cfg, model = load_run(run_dir)
    rows = evaluate_model(model, load_data(cfg.data), cfg, tuple(nprobe) if nprobe else None)
    typer.echo(format_rows(rows))


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="A folder written by 'poeem train' with a Poeem layer.")],
    out: Annotated[Path, typer.Option(help="The index directory to create.")],
    fast_scan: Annotated[bool, typer.Option(help="4-bit fast-scan FAISS index (needs K=16).")] = False,
) -> None:
    """Export the learned index of a run into a FAISS index directory, with no training."""
    import time

    from poeem.runs import load_run
    from poeem.search.searcher import Searcher

    cfg, model = load_run(run_dir)
    if model.index is None:
        raise PoeemError(
            "export",
            "a run trained with a Poeem layer",
            f"'{run_dir}' (baseline, no layer)",
            "train with --poeem, or build a FAISS index the usual way",
        )
    started = time.perf_counter()
    xb = model.all_item_embeddings()
    tower = model.query_tower
    args = {
        "num_ids": tower.embedding.num_embeddings,
        "dim": cfg.model.dim,
        "num_numeric": 0 if tower.numeric is None else tower.numeric[0].in_features,
        "hidden": list(cfg.model.query_hidden),
        "normalize": cfg.model.score == "cosine",
    }
    searcher = Searcher.create(
        out,
        model.index,
        xb,
        metric=model.config.search_metric,
        fast_scan=fast_scan,
        query_tower=tower,
        query_tower_args=args,
    )
    typer.echo(
        f"exported {searcher.ntotal} items ({searcher.nlist} lists, metric {searcher.metric}) "
        f"to {out} in {time.perf_counter() - started:.2f}s"
    )


def _read_ids(path: Path) -> np.ndarray:
    from poeem.data.files import require_file

    require_file(path, "ids file")
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False).astype(np.int64).ravel()
    values = []
    for no, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                values.append(int(line.split(",")[0]))
            except ValueError:
                from poeem.data.files import malformed

                raise malformed(path, no, "one integer id per line", line) from None
    return np.array(values, dtype=np.int64)


def _read_vectors(path: Path) -> np.ndarray:
    from poeem.data.files import require_file

    require_file(path, "embeddings file")
    if path.suffix != ".npy":
        raise PoeemError(
            "embeddings file",
            "a .npy float array of shape (n, dim)",
            f"'{path.name}'",
            "save embeddings with numpy.save",
        )
    try:
        return np.load(path, allow_pickle=False).astype(np.float32)
    except ValueError as err:
        raise PoeemError(
            "embeddings file", "a numeric .npy array", f"'{path}' ({err})", "re-save it"
        ) from None


@app.command()
def search(
    index_dir: Annotated[Path, typer.Argument(help="A folder written by 'poeem export'.")],
    query_file: Annotated[Path, typer.Option(help="(nq, dim) embeddings as .npy, or query ids (.txt/.csv).")],
    k: Annotated[int, typer.Option("-k", "--k", help="Results per query.")] = 10,
    nprobe: Annotated[int, typer.Option(help="IVF lists to probe.")] = 1,
    backend: Annotated[str, typer.Option(help="faiss | torch")] = "faiss",
    out: Annotated[Path | None, typer.Option(help="Write results as CSV here (default: stdout).")] = None,
) -> None:
    """Search an index directory; prints CSV rows query,rank,id,score."""
    from poeem.search.searcher import Searcher

    searcher = Searcher.load(index_dir, backend=backend)  # type: ignore[arg-type]
    if query_file.suffix == ".npy":
        xq = _read_vectors(query_file)
        names = list(range(len(xq)))
    else:
        qids = _read_ids(query_file)
        xq, names = searcher.embed_queries(qids), qids.tolist()
    d, i = searcher.search(xq, k, nprobe)
    lines = ["query,rank,id,score"] + [
        f"{names[q]},{r + 1},{i[q, r]},{d[q, r]:.6g}"
        for q in range(len(names))
        for r in range(i.shape[1])
        if i[q, r] >= 0
    ]
    text = "\n".join(lines) + "\n"
    if out is None:
        typer.echo(text, nl=False)
    else:
        from poeem.training.checkpoint import atomic_write_text

        atomic_write_text(out, text)
        typer.echo(f"wrote {len(lines) - 1} results to {out}")


@app.command()
def add(
    index_dir: Annotated[Path, typer.Argument(help="A folder written by 'poeem export'.")],
    items: Annotated[Path, typer.Option(help="(n, dim) item embeddings as .npy.")],
    ids: Annotated[Path, typer.Option(help="n item ids, as .npy or one per line.")],
) -> None:
    """Add items, coded with the frozen codebooks (no retraining); saved atomically."""
    from poeem.search.searcher import Searcher

    searcher = Searcher.load(index_dir)
    searcher.add(_read_vectors(items), _read_ids(ids))
    typer.echo(f"index now holds {searcher.ntotal} items")


@app.command()
def remove(
    index_dir: Annotated[Path, typer.Argument(help="A folder written by 'poeem export'.")],
    ids: Annotated[Path, typer.Option(help="Item ids to remove, as .npy or one per line.")],
) -> None:
    """Remove items by id; saved atomically."""
    from poeem.search.searcher import Searcher

    searcher = Searcher.load(index_dir)
    removed = searcher.remove(_read_ids(ids))
    typer.echo(f"removed {removed} items; index now holds {searcher.ntotal}")


def main() -> None:
    """Entry point: bad input ends with one clear line on stderr and exit code 2."""
    import warnings

    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"
    try:
        app()
    except PoeemError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted (checkpoints written so far are intact)", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
