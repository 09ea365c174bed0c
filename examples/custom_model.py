# %% [markdown]
# # The Poeem layer in your own model
#
# Most users already have a retrieval model and a training loop. This example shows the whole
# path with nothing from `poeem.training`: a small two-tower model written here, whose item
# tower is an MLP over item features, a hand-written loop with an in-batch softmax, the
# `PoeemLayer` at the end of the item tower, and a FAISS index exported from the layer without
# any FAISS training. It ends by checking that FAISS returns the same top-k as the model's
# own quantized scores.
#
#     python examples/custom_model.py             # about 10 s on 2 CPU cores
#     python examples/custom_model.py --tiny      # seconds (what CI runs)

# %%
from __future__ import annotations

import argparse
import time

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import poeem

parser = argparse.ArgumentParser(description="The Poeem layer in a hand-written two-tower model.")
parser.add_argument("--users", type=int, default=5000)
parser.add_argument("--items", type=int, default=20000)
parser.add_argument("--steps", type=int, default=1500)
parser.add_argument("--tiny", action="store_true", help="a few seconds, for CI")
args, _ = parser.parse_known_args()  # parse_known_args: also runs inside a notebook kernel
if args.tiny:
    args.users, args.items, args.steps = 500, 2000, 150
torch.manual_seed(0)
rng = np.random.default_rng(0)

# %% [markdown]
# ## Data
#
# Each item has 24 numeric features (think price, category one-hots, text statistics). Users
# like items whose hidden "taste" vector is close to theirs; the taste is a fixed function of
# the features, which the item tower has to learn. We draw (user, item) clicks from that rule.

# %%
NUM_FEATURES, TASTE = 24, 8
item_features = torch.from_numpy(rng.normal(size=(args.items, NUM_FEATURES)).astype(np.float32))
mixing = torch.from_numpy(rng.normal(size=(NUM_FEATURES, TASTE)).astype(np.float32))
item_taste = F.normalize(torch.tanh(item_features @ mixing), dim=1)
user_taste = F.normalize(torch.from_numpy(rng.normal(size=(args.users, TASTE)).astype(np.float32)), dim=1)
with torch.no_grad():  # each user clicks among their 50 best items
    favourites = (user_taste @ item_taste.T).topk(50, dim=1).indices
clicks_user = torch.arange(args.users).repeat_interleave(50)
clicks_item = favourites.flatten()
print(f"{args.users} users, {args.items} items, {len(clicks_user)} clicks")

# %% [markdown]
# ## Your model, with the layer at the end of the item tower
#
# `PoeemLayer(...)` returns a `PoeemOutput`: `.output` is the quantized item (its gradient passes
# straight through to the tower) and `.loss` trains the codebooks and the rotation. Once it
# quantizes, two more terms train for retrieval: the task loss on the un-quantized items too
# (`task_items` names the items a step scores: in turn the quantized and the un-quantized ones),
# and `routing_loss`, which teaches the query tower the list its items are in. For the first
# `warmup_steps` it is the identity; then it collects `buffer_size` item embeddings, runs
# k-means (here with an OPQ rotation) and starts quantizing. Budget: 16 lists, 8 sub-codes of
# 8 bits, so 8 bytes per item.


# %%
class TwoTower(nn.Module):
    def __init__(self, num_users: int, dim: int = 32) -> None:
        super().__init__()
        self.users = nn.Embedding(num_users, dim)
        nn.init.normal_(self.users.weight, std=0.1)
        self.item_mlp = nn.Sequential(nn.Linear(NUM_FEATURES, 64), nn.ReLU(), nn.Linear(64, dim))
        self.index = poeem.PoeemLayer(
            dim=dim,
            num_subspaces=8,
            codebook_size=256,
            num_coarse=16,
            rotation="opq",
            warmup_steps=args.steps // 3,
            buffer_size=4096 if not args.tiny else 1024,
        )

    def user_vectors(self, users: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.users(users), dim=1)

    def item_vectors(self, features: torch.Tensor) -> torch.Tensor:
        """Item embeddings before the layer: what gets quantized and exported."""
        return F.normalize(self.item_mlp(features), dim=1)

    def forward(self, users: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, x = self.user_vectors(users), self.item_vectors(features)
        quantized = self.index(x)
        target = torch.arange(len(users))
        # the in-batch softmax on the items the layer names this step: the quantized ones and, in
        # turn, the un-quantized ones (which keep the towers whole; docs/design.md)
        scored = self.index.task_items(x, quantized)
        task = sum(w * F.cross_entropy(q @ items.T / 0.05, target) for w, items in scored)
        index_loss = quantized.loss
        if quantized.quantized:  # the layer's routing term
            index_loss = index_loss + self.index.routing_loss(q, quantized.coarse_codes)
        return task, index_loss


model = TwoTower(args.users)
optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

# %% [markdown]
# ## A hand-written training loop
#
# The only Poeem-specific line is adding the layer's losses to the task loss.

# %%
started = time.perf_counter()
for step in range(args.steps):
    batch = torch.randint(len(clicks_user), (512,))
    task_loss, index_loss = model(clicks_user[batch], item_features[clicks_item[batch]])
    optimizer.zero_grad()
    (task_loss + index_loss).backward()
    optimizer.step()
    if (step + 1) % max(1, args.steps // 5) == 0:
        health = model.index.stats()
        shown = f", relative distortion {health['relative_distortion']:.3f}" if health else " (warm start)"
        print(f"step {step + 1}: task loss {task_loss.item():.3f}, phase {model.index.phase_name}{shown}")
print(f"trained in {time.perf_counter() - started:.1f}s")

# %% [markdown]
# ## Export to FAISS, with no FAISS training
#
# The codebooks, the coarse centroids and the rotation are copied into a FAISS `IndexIVFPQ`;
# the items' codes are the layer's own. The user and item vectors are normalised, so the
# metric is inner product. Item ids can be your own 64-bit ids.

# %%
model.eval()
with torch.no_grad():
    items = model.item_vectors(item_features)
    users = model.user_vectors(torch.arange(args.users))
item_ids = np.arange(args.items) + 1_000_000  # e.g. your catalogue's ids
started = time.perf_counter()
index = poeem.export.to_faiss(model.index, items, ids=item_ids, metric="ip")
print(f"exported {index.ntotal} items in {time.perf_counter() - started:.3f}s")

# %% [markdown]
# ## FAISS returns what the model scores
#
# The model's score of an item is the user vector against the item's quantized embedding
# (`layer.decode(layer.encode(x))`). Probing every list, FAISS must return the same top-k,
# up to ties. At nprobe 1 it returns the best items of the list each user is routed to.

# %%
K = 10
with torch.no_grad():
    reconstructed = model.index.decode(*model.index.encode(items))
    model_top = (users @ reconstructed.T).topk(K, dim=1)
faiss.ParameterSpace().set_index_parameter(index, "nprobe", 16)  # all lists
scores, found = index.search(users.numpy(), K)
same = np.mean([set(a) == set(b) for a, b in zip(found - 1_000_000, model_top.indices.numpy(), strict=True)])
np.testing.assert_allclose(scores, model_top.values.numpy(), atol=1e-4)
print(f"FAISS top-{K} equals the model's quantized top-{K} for {same:.1%} of users (scores equal to 1e-4)")
assert same > 0.99, "FAISS and the model disagree"

# %% [markdown]
# How good is the index? Recall of each user's 50 favourites, exact search on the un-quantized
# vectors against the learned index at nprobe 1:

# %%
with torch.no_grad():
    exact = (users @ items.T).topk(50, dim=1).indices.numpy()
faiss.ParameterSpace().set_index_parameter(index, "nprobe", 1)
_, approx = index.search(users.numpy(), 50)
truth = favourites.numpy()


def recall(found_ids: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / 50 for f, t in zip(found_ids, truth, strict=True)]))


print(
    f"recall@50 of the favourites: exact {recall(exact):.3f}, index at nprobe 1 {recall(approx - 10**6):.3f}"
)
