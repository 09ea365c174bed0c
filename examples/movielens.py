# %% [markdown]
# # MovieLens end to end
#
# A worked example on MovieLens 100K: train a two-tower recommender with and without the Poeem
# layer, compare exact search, FAISS and Poeem at the same bytes per movie, export the learned
# index, ask for a real user's top-10 movies by title, add a new movie without retraining, and
# serve the index over HTTP. Each cell is a step; the file opens as a notebook in VS Code,
# PyCharm or Jupytext, and runs as a script:
#
#     python examples/movielens.py --data-path ../shared/datasets/ml-100k    # 30 s on 2 CPU cores
#     POEEM_MOVIELENS=/data/ml-100k python examples/movielens.py
#
# It needs the extracted `ml-100k` folder (`u.data` for ratings, `u.item` for titles), from
# https://grouplens.org/datasets/movielens/100k/.

# %%
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch
import torch.nn.functional as F

import poeem
from poeem.data import DataConfig, load_movielens
from poeem.evaluation.format import format_rows
from poeem.model import ModelConfig
from poeem.pipeline import EvalConfig, RunConfig, export_run, load_run, train_run
from poeem.pipeline.run_dir import read_artifacts
from poeem.training import TrainConfig

parser = argparse.ArgumentParser(description="MovieLens 100K with Poeem, end to end.")
parser.add_argument("--data-path", default=os.environ.get("POEEM_MOVIELENS", "../shared/datasets/ml-100k"))
parser.add_argument("--out", type=Path, default=Path("runs/movielens-tutorial"))
parser.add_argument("--epochs", type=int, default=20)
parser.add_argument("--user", type=int, default=1, help="the MovieLens user id to recommend for")
args, _ = parser.parse_known_args()  # parse_known_args: also runs inside a notebook kernel
data_path = Path(args.data_path)
if not (data_path / "u.data").is_file():
    raise SystemExit(f"no MovieLens 100K at '{data_path}': pass --data-path or set POEEM_MOVIELENS")
if args.out.exists():
    shutil.rmtree(args.out)  # this tutorial's own output folder: start clean each run

# %% [markdown]
# ## 1. Load the ratings
#
# Every rating counts as a positive interaction. For each user, a random 20% of their movies is
# held out for testing. Ids stay MovieLens's own: poeem maps them to dense rows internally and
# back at every boundary. Titles come from `u.item`.

# %%
data = load_movielens(data_path, split="random", test_fraction=0.2)
print(data.summary())
titles = {}
for line in (data_path / "u.item").read_text(encoding="latin-1").splitlines():
    fields = line.split("|")
    titles[int(fields[0])] = (fields[1], [g for g, flag in enumerate(fields[5:24]) if flag == "1"])

# %% [markdown]
# ## 2. Train a baseline and a Poeem model
#
# Both are the same two-tower model: a 64-dimensional embedding per user and per movie, cosine
# scores at temperature 0.1, in-batch softmax with the logQ popularity correction. The Poeem
# model ends its movie tower with a `PoeemLayer`: 8 IVF lists and 8 sub-codes of 4 bits, that is
# 4 bytes per movie. It trains without quantization for the first third of the steps, then
# k-means initializes the codebooks (learnable Givens rotation on top of OPQ) and the model
# trains with the quantized movies. When training ends, the run serves its index as training
# left it, ready at once (the default). `TrainConfig(refit="rq")` would instead keep the lists
# it trained and code the movies again with a residual quantizer fitted on their final
# embeddings, taught the model's own ranking: a build after training (docs/design.md, "Refit
# after training").

# %%
data_config = DataConfig(kind="movielens", path=str(data_path), split="random", test_fraction=0.2)
model_config = ModelConfig(dim=64, score="cosine", temperature=0.1, logq_correction=True)
train_config = TrainConfig(epochs=args.epochs, batch_size=1024, lr=5e-3, checkpoint_every=0, progress=False)
steps = args.epochs * -(-data.num_train // train_config.batch_size)
layer = {
    "num_coarse": 8,
    "num_subspaces": 8,
    "codebook_size": 16,
    "rotation": "givens",
    "warmup_steps": steps // 3,
    "buffer_size": min(8192, data.num_items),
}
evaluation = EvalConfig(ks=(10, 20), nprobes=(1, 8), num_coarse=8, num_subspaces=8, codebook_size=16)
runs = {}
for name, poeem_layer in (("baseline", None), ("poeem", layer)):
    config = RunConfig(
        data_config, ModelConfig(**{**model_config.to_dict(), "poeem": poeem_layer}), train_config, evaluation
    )
    started = time.perf_counter()
    _, metrics = train_run(config, args.out / name)
    runs[name] = metrics
    print(f"{name}: trained in {time.perf_counter() - started:.0f}s")

# %% [markdown]
# ## 3. Exact search, FAISS and Poeem at the same bytes
#
# - **exact**: brute force over the baseline's un-quantized movie embeddings;
# - **faiss-ivfpq**: the usual pipeline, FAISS `IVF8,PQ8x4` trained on those embeddings after
#   training;
# - **poeem**: the Poeem model's index as training left it, exported to FAISS without any
#   FAISS training (the paper's index: it exists the moment training ends).
#
# At nprobe 1 a user's query probes one of the 8 lists; at nprobe 8 it scans them all.

# %%
rows = runs["baseline"]["rows"] + [r for r in runs["poeem"]["rows"] if r["method"].startswith("poeem")]
print(format_rows(rows, ("recall@20", "ndcg@20")))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

shown = {"poeem": "poeem\n(as trained)"}
labels = [
    f"{shown.get(r['method'], r['method'])}\nnprobe {r['nprobe']}" if r["method"] != "exact" else "exact"
    for r in rows
]
fig, ax = plt.subplots(figsize=(9, 3.5))
colors = {"exact": "#555", "faiss-ivfpq": "#c66", "poeem": "#37a"}
ax.bar(labels, [r["recall@20"] for r in rows], color=[colors[r["method"]] for r in rows])
ax.set_ylabel("recall@20")
ax.set_title("MovieLens 100K, 4 bytes per movie")
fig.tight_layout()
fig.savefig(args.out / "comparison.png", dpi=120)
print(f"plot: {args.out / 'comparison.png'}")

# %% [markdown]
# ## 4. Export the learned index
#
# `export_run` writes an index directory: the FAISS index built from the layer's codes (no
# training), the same index as safetensors, the user tower, the id maps and a checksummed
# manifest. Building it takes a fraction of a second.

# %%
started = time.perf_counter()
searcher = export_run(args.out / "poeem", args.out / "index")
print(f"exported {searcher.ntotal} movies in {time.perf_counter() - started:.2f}s to {args.out / 'index'}")

# %% [markdown]
# ## 5. A real user's top-10
#
# The searcher embeds the user (by MovieLens user id) with the saved tower and returns MovieLens
# movie ids. We drop the movies this user has already rated, as a recommender would.

# %%
seen_rows = data.train_items[data.train_queries == data.query_keys.rows([args.user])[0]]
seen = set(data.item_keys.raw(seen_rows).tolist())
_, movie_ids = searcher.search(searcher.embed_queries([args.user]), 10, nprobe=1, exclude=[seen])
top10 = [m for m in movie_ids[0].tolist() if m >= 0]  # -1: the probed list ran short
print(f"user {args.user} rated {len(seen)} movies; top-10 new ones:")
for rank, movie in enumerate(top10, 1):
    print(f"{rank:>3}. {titles.get(movie, ('?', []))[0]}")

# %% [markdown]
# ## 6. Add a new movie without retraining
#
# A movie released after training has no learned embedding. A simple cold-start embedding is
# the mean of the movies that share its genres; `Searcher.add` codes it with the frozen
# codebooks and publishes a new version of the index directory. Its nearest movies show where
# it landed.

# %%
_, model = load_run(args.out / "poeem")
artifacts = read_artifacts(args.out / "poeem")
with torch.no_grad():
    embeddings = model.all_item_embeddings()
template = top10[0]
genres = set(titles[template][1])
similar = [
    m for m, (_, g) in titles.items() if set(g) == genres and m in set(artifacts.item_keys.keys.tolist())
]
new_embedding = F.normalize(
    embeddings[torch.from_numpy(artifacts.item_keys.rows(similar))].mean(0, keepdim=True), dim=1
)
new_id = max(titles) + 1
searcher.add(new_embedding, [new_id])
titles[new_id] = (f"A new film like '{titles[template][0]}'", list(genres))
_, neighbours = searcher.search(new_embedding, 6, nprobe=8)
print(f"added movie {new_id} (index version {searcher.version}); its nearest movies:")
for movie in neighbours[0].tolist():
    print(f"     {movie:>5}  {titles.get(movie, ('?', []))[0]}")

# %% [markdown]
# ## 7. Serve it
#
# `poeem serve` puts the index behind an HTTP API. Here we start it on a free local port, ask
# for the same user's top-10 (excluding the movies they rated), and stop it. From a shell,
# the request is the `curl` line printed below. The answer must be what the searcher returns
# for the current version (which now holds the new movie too).

# %%
_, again = searcher.search(searcher.embed_queries([args.user]), 10, nprobe=1, exclude=[seen])
expected = [m for m in again[0].tolist() if m >= 0]
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
server = subprocess.Popen(
    [
        sys.executable,
        "-m",
        "poeem.cli",
        "serve",
        str(args.out / "index"),
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
)
try:
    for _ in range(300):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2):
                break
        except OSError:
            time.sleep(0.2)
    body = {"queries": [{"id": args.user, "exclude": sorted(seen)}], "k": 10, "nprobe": 1}
    print(
        f"curl -s localhost:{port}/search -H 'content-type: application/json' -d '{json.dumps(body)[:80]}...'"
    )
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/search", json.dumps(body).encode(), {"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        answer = json.load(response)
finally:
    server.terminate()
    server.wait(timeout=30)
served = answer["results"][0]["ids"]
print("served top-10:", [titles.get(m, ("?",))[0] for m in served[:3]], "...")
assert served == expected, "the service and the searcher must agree"
print(f"poeem {poeem.__version__}: done; everything is in {args.out}")
