"""The examples run as a user runs them, on tiny generated data, so they cannot rot."""

import subprocess
import sys
from pathlib import Path

import numpy as np

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def write_movielens(folder: Path, users: int = 60, movies: int = 150, seed: int = 0) -> Path:
    """A MovieLens-100K-format folder: u.data (tab-separated ratings) and u.item (titles, genres)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    genre_of = rng.integers(0, 19, movies)
    lines = []
    for user in range(1, users + 1):
        taste = rng.integers(0, 19)
        liked = np.flatnonzero(genre_of == taste) + 1
        picks = rng.choice(liked, min(len(liked), 25), replace=False) if len(liked) else []
        others = rng.choice(movies, 15, replace=False) + 1
        for t, movie in enumerate([*picks, *others]):
            lines.append(f"{user}\t{movie}\t{rng.integers(1, 6)}\t{880000000 + t}")
    (folder / "u.data").write_text("\n".join(lines) + "\n")
    items = []
    for movie in range(1, movies + 1):
        flags = ["0"] * 19
        flags[genre_of[movie - 1]] = "1"
        items.append(
            f"{movie}|Movie {movie} (1995)|01-Jan-1995||http://example.invalid/{movie}|" + "|".join(flags)
        )
    (folder / "u.item").write_text("\n".join(items) + "\n", encoding="latin-1")
    return folder


def run(script: str, *args: str, cwd: Path) -> str:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True, cwd=cwd, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_movielens_tutorial_runs_end_to_end(tmp_path: Path) -> None:
    data = write_movielens(tmp_path / "ml-100k")
    out = run(
        "movielens.py",
        "--data-path",
        str(data),
        "--out",
        str(tmp_path / "out"),
        "--epochs",
        "3",
        cwd=tmp_path,
    )
    assert "top-10 new ones:" in out and "Movie " in out
    assert "added movie 151" in out and "served top-10" in out
    assert (tmp_path / "out" / "comparison.png").is_file()
    assert (tmp_path / "out" / "index" / "manifest.json").is_file()


def test_movielens_tutorial_says_where_the_data_is_missing(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "movielens.py"), "--data-path", str(tmp_path / "nothing")],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and "pass --data-path or set POEEM_MOVIELENS" in result.stderr


def test_custom_model_example_runs_and_checks_faiss(tmp_path: Path) -> None:
    out = run("custom_model.py", "--tiny", cwd=tmp_path)
    assert "FAISS top-10 equals the model's quantized top-10" in out
    assert "recall@50 of the favourites" in out
