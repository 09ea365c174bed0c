"""The ``poeem`` command line: demo, train, evaluate, export, search, add, remove."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

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
    _overrides(raw["model"], dim=dim, temperature=temperature)
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
    from poeem.evaluation.report import compare_indexes
    from poeem.evaluation.table import format_rows
    from poeem.runs import load_run
    from poeem.training.run import budget_of

    cfg, model = load_run(run_dir)
    rows = compare_indexes(
        model,
        load_data(cfg.data),
        cfg.eval.ks,
        tuple(nprobe or cfg.eval.nprobes),
        cfg.eval.faiss_baseline,
        budget_of(model, cfg),
        seed=cfg.train.seed,
    )
    typer.echo(format_rows(rows))


def main() -> None:
    """Entry point: bad input ends with one clear line on stderr and exit code 2."""
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
