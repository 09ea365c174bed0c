"""Regenerate docs/benchmarks.md and docs/img/*.png from benchmarks/results/*.json.

    python benchmarks/report.py

Every table shows the command that produced it and the machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import NullFormatter

from common import RESULTS, pareto_front

DOCS = Path(__file__).resolve().parents[1] / "docs"
PUBLISHED_GOWALLA = {"LightGCN": 0.1830, "NGCF": 0.1570, "MF (BPR, NGCF paper)": 0.1291}


def load(results: Path) -> dict[str, dict[str, Any]]:
    return {
        p.stem: json.loads(p.read_text()) for p in sorted(results.glob("*.json")) if "_tiny" not in p.stem
    }


def provenance(r: dict[str, Any]) -> str:
    m = r["machine"]
    commands = "`, then `".join(
        re.sub(r"^python (\w+\.py)", r"python benchmarks/\1", c) for c in r.get("commands", [r["command"]])
    )
    return (
        f"Command: `{commands}`  \nMachine: {m['cpu']}, {m['cores']} cores; torch {m['torch']}, "
        f"faiss {m['faiss']}, Python {m['python']}; run on {r['date']}."
    )


def sharding_section(r: dict[str, Any]) -> list[str]:
    """Training on 1 and 2 processes with replicated and TorchRec-sharded id tables."""
    lines = [
        "### Id tables replicated against sharded over 2 processes",
        "",
        "Training with the layer (dim 64, row-wise Adagrad on the tables, same global batch "
        f"{r['config']['batch_size']}). Each rank's peak resident memory, and its resident memory "
        "after training. On 2 cores, 2 processes measure the overhead of the exchange, not a "
        "speed-up.",
        "",
        "| items | processes | steps/s | peak GB per rank | peak per rank / one process "
        "| resident after training, GB per rank |",
        "|---:|---|---:|---|---|---|",
    ]
    for row in r["rows"]:
        one = row["processes"]["1"]["peak_rss_gb_per_rank"][0]
        for name, rate in row.get("processes", {}).items():
            peaks = " / ".join(f"{x:.2f}" for x in rate["peak_rss_gb_per_rank"])
            ratios = " / ".join(f"{x / one:.2f}x" for x in rate["peak_rss_gb_per_rank"])
            now = " / ".join(f"{x:.2f}" for x in rate["resident_after_training_gb_per_rank"])
            label = name.replace("-sharded", ", tables sharded")
            lines.append(
                f"| {row['items']:,} | {label} | {rate['steps_per_s']:.2f} | {peaks} | {ratios} | {now} |"
            )
    return [*lines, "", provenance(r), ""]


def sharded_recall_section(r: dict[str, Any]) -> list[str]:
    """Exported recall of runs with sharded tables against the same runs in one process."""
    rows = [row for row in r["rows"] if row["method"] == "poeem" and row["nprobe"] == 1]
    lines = [
        "### Exported recall with sharded id tables",
        "",
        "`poeem train` on MovieLens 100K (random 80/20 split, the layer's defaults, row-wise Adagrad "
        "on the tables), in one process and on 2 processes with `--table-sharding torchrec`, same "
        "seed and global batch; recall@20 of the index each run serves, at nprobe 1.",
        "",
        "| seed | one process | 2 processes, tables sharded | difference |",
        "|---:|---:|---:|---:|",
    ]
    by_seed = {(row["seed"], row["sharded"]): row["recall@20"] for row in rows}
    one = [by_seed[(s, False)] for s in r["config"]["seeds"]]
    for seed in r["config"]["seeds"]:
        a, b = by_seed[(seed, False)], by_seed[(seed, True)]
        lines.append(f"| {seed} | {a:.4f} | {b:.4f} | {b - a:+.4f} |")
    spread = max(one) - min(one)
    lines += ["", f"Seed-to-seed spread of the one-process runs: {spread:.4f}.", "", provenance(r), ""]
    return lines


def export_section(r: dict[str, Any]) -> list[str]:
    c = r["config"]
    return [
        "## Index build time: zero-training export vs FAISS train + add",
        "",
        f"{c['n']:,} items x {c['dim']} dims, IVF{c['nlist']},PQ{c['m']}x{c['nbits']}, inner product.",
        "",
        "| build | seconds | speed-up vs FAISS |",
        "|---|---:|---:|",
        f"| FAISS train + add | {r['faiss_train_add_s']:.2f} | 1x |",
        f"| poeem export of the trained codes | {r['poeem_export_from_codes_s']:.3f} | "
        f"{r['speedup_from_codes']:.0f}x |",
        f"| poeem encode (frozen codebooks) + export | {r['poeem_export_from_embeddings_s']:.2f} | "
        f"{r['speedup_from_embeddings']:.1f}x |",
        "",
        "The first poeem row is what the paper calls indexing: training already computed every item's "
        "codes, and export only copies centroids, codebooks and codes into FAISS. The second row also "
        "re-encodes all items with the frozen codebooks (what `poeem add` does for new items).",
        "",
        provenance(r),
        "",
    ]


def search_speed_section(r: dict[str, Any]) -> list[str]:
    c = r["config"]
    lines = [
        "## Search time of the index directory's backends",
        "",
        f"{c['n']:,} items x {c['dim']} dims, IVF{c['nlist']},PQ{c['m']}x8, inner product, "
        f"{c['queries']:,} queries, top-{c['k']}, best of {c['repeats']}.",
        "",
        "| backend | nprobe | seconds | queries/s | top-k overlap with FAISS |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in r["rows"]:
        overlap = f"{row['topk_overlap_with_faiss']:.4f}" if "topk_overlap_with_faiss" in row else ""
        lines.append(
            f"| {row['backend']} | {row['nprobe']} | {row['seconds']:.3f} | {row['qps']:,.0f} | {overlap} |"
        )
    lines += [
        "",
        "The torch ADC scans only the probed lists. The previous version scored every item and then "
        "masked the unprobed lists: on the same index and queries it took 4.65 s at nprobe 1 and "
        "4.72 s at nprobe 8 (best of 3, measured once on this machine with the code of commit "
        "6b2068c; not re-run by this script).",
        "",
        provenance(r),
        "",
    ]
    return lines


def backend_agreement_section(r: dict[str, Any]) -> list[str]:
    lines = [
        "## The two backends on a fast-scan index",
        "",
        f"{r['items']:,} clustered items, {r['index']}, {r['metric']}; {r['queries']:,} queries, "
        f"top-{r['k']} (`benchmarks/backend_agreement.py`). Shares of queries on which the torch "
        "backend matches FAISS: the same id lists, the same sets, the same ids above the k-th score "
        "(items tied at it may differ), all scores within 1e-5 relative. 'Float formula': torch "
        "scoring without FAISS's 8-bit rounding of the look-up tables, as it did before.",
        "",
        "| backend | nprobe | identical lists | same sets | same ids above ties | scores within 1e-5 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in r["rows"]:
        lines.append(
            f"| {row['backend']} | {row['nprobe']} | {row['identical_lists']:.1%} | {row['same_sets']:.1%} "
            f"| {row['same_ids_above_ties']:.1%} | {row['scores_within_1e-5']:.1%} |"
        )
    return [*lines, "", provenance(r), ""]


def poeem_build_s(row: dict[str, Any]) -> float | None:
    """poeem's embed + encode + export seconds (older results timed embed and encode apart), or
    None where the export from scratch was skipped."""
    if "export_s" not in row:
        return None
    embed_encode = row.get("embed_encode_s", row.get("embed_s", 0.0) + row.get("encode_s", 0.0))
    return embed_encode + row["export_s"]


def faiss_build_s(row: dict[str, Any]) -> float | None:
    """FAISS train + add seconds, or None where FAISS was not built."""
    return row["faiss_train_s"] + row["faiss_add_s"] if "faiss_add_s" in row else None


BF16_MARK = {"bfloat16": " (bf16)"}


def scale_section(r: dict[str, Any], img: Path, before: dict[str, Any] | None = None) -> list[str]:
    c, rows = r["config"], r["rows"]
    tables = c.get("table_optimizer", "dense")
    lines = [
        "## Scale: how each cost grows with the catalogue",
        "",
        f"Synthetic catalogue, dim {c['dim']}, 8 bytes per item (IVF coarse_K, PQ8x8; coarse_K the power "
        f"of two nearest sqrt(n)), {c['num_queries']:,} query ids, global batch {c['batch_size']}, "
        f"{c['steps']} timed steps after {c['warm']}; id tables on `{tables}`, the rest on Adam. "
        "Untrained towers: these are costs, not quality. In brackets: the layer without its routing term "
        "(`routing_weight` 0); where coarse_K exceeds the batch, that term's softmax scores only the lists "
        "of the batch's positives (`routing_lists` auto). "
        "Peak memory is the process's peak resident "
        "memory after training, and after poeem's exports (before FAISS is built)."
        + (
            ""
            if r.get("faiss_polysemous_training") is False
            else " FAISS train + add here includes polysemous training, which `index_factory` turns on "
            "for 8-bit PQ and search never uses: about 9 s at every size on this machine (IVF1024,PQ8x8 "
            "on 1M items trained in 18.2 s with it, 9.4 s without); later runs switch it off."
        ),
        "",
        "| items | coarse_K | steps/s no layer | steps/s layer (no routing) | peak GB training / export "
        "| warm-start k-means s | poeem export, encoding every item s "
        "| poeem export, lists from training (default) / codes from training s "
        "| FAISS train + add s | search ms/query poeem / FAISS, nprobe 1 | nprobe 16 "
        "| list imbalance poeem / FAISS |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def pair(values: dict[str, float], key: str, digits: int) -> str:
        return " / ".join(f"{values[k]:.{digits}f}" for k in (f"poeem{key}", f"faiss{key}") if k in values)

    for row in rows:
        ms, faiss_s = row["search_ms_per_query"], faiss_build_s(row)
        peak = f"{row['peak_rss_training_gb']:.1f} / {row.get('peak_rss_export_gb', row['peak_rss_gb']):.1f}"
        elsewhere = "*" if "elsewhere" in row else ""  # a row kept from another machine or commit
        no_routing = (
            f" ({row['poeem_no_routing_steps_per_s']:.2f})" if "poeem_no_routing_steps_per_s" in row else ""
        )
        lines.append(
            f"| {row['items']:,}{elsewhere}{BF16_MARK.get(row.get('table_dtype', ''), '')} | "
            f"{row['coarse_K']:,} | {row['baseline_steps_per_s']:.2f} | "
            f"{row['poeem_steps_per_s']:.2f}{no_routing} | {peak} | {row['warm_start_kmeans_s']:.1f} | "
            f"{fmt_optional(poeem_build_s(row), 1)} | {fmt_optional(row.get('trained_lists_export_s'), 1)} / "
            f"{fmt_optional(row.get('trained_export_s'), 1)} | "
            f"{fmt_optional(faiss_s, 1)} | "
            f"{pair(ms, '@1', 3)} | {pair(ms, '@16', 3)} | {pair(row['imbalance'], '', 2)} |"
        )
    largest = max(rows, key=lambda row: row["items"])
    lines += [f"\n\\* {row['elsewhere']}" for row in rows if "elsewhere" in row]
    if any(row.get("table_dtype") == "bfloat16" for row in rows):
        lines += [
            "\n(bf16): id tables stored in bfloat16 (`--table-dtype bfloat16`, row-wise Adagrad with "
            "stochastic rounding)."
        ]
    if any(poeem_build_s(row) is None for row in rows):
        lines += [
            "\n'-' under 'encoding every item': that export was not run (`--scratch-max-size`); the "
            "layer's memory of training held random codes for the exports from training."
        ]
    lines += [
        "",
        f"Largest size run: {largest['items']:,} items, peak resident memory "
        f"{largest['peak_rss_gb']:.1f} GB.",
        "",
        "Training with the layer on 1 and 2 processes (torch.distributed, gloo, same global batch; "
        "the layer's k-means replaced by a random init, since only steps/s count here):",
        "",
        "| items | processes | steps/s | samples/s |",
        "|---:|---:|---:|---:|",
    ]
    for row in rows:
        for world, rate in row.get("processes", {}).items():
            lines.append(
                f"| {row['items']:,} | {world} | {rate['steps_per_s']:.2f} | {rate['samples_per_s']:,.0f} |"
            )
    if before is not None:
        old = {row["items"]: row for row in before["rows"]}
        lines += [
            "",
            "Against dense tables (Adam on every row, `benchmarks/results/scale_dense.json`, "
            f"made by `{'` and `'.join(before.get('commands', [before['command']]))}` on {before['date']}; "
            + ("same machine):" if before["machine"] == r["machine"] else f"on {before['machine']['cpu']}):"),
            "",
            "| items | steps/s layer, dense / sparse | peak training GB, dense / sparse "
            "| 2 processes steps/s, dense / sparse |",
            "|---:|---:|---:|---:|",
        ]
        for row in rows:
            if row["items"] not in old:
                continue
            o = old[row["items"]]
            two = [x.get("processes", {}).get("2", {}).get("steps_per_s") for x in (o, row)]
            lines.append(
                f"| {row['items']:,} | {o['poeem_steps_per_s']:.2f} / {row['poeem_steps_per_s']:.2f} | "
                f"{o['peak_rss_training_gb']:.1f} / {row['peak_rss_training_gb']:.1f} | "
                + " / ".join("-" if t is None else f"{t:.2f}" for t in two)
                + " |"
            )
    n = [row["items"] for row in rows]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    curves = {
        "training step, no layer": [1 / row["baseline_steps_per_s"] for row in rows],
        "training step, with layer": [1 / row["poeem_steps_per_s"] for row in rows],
        "warm-start k-means": [row["warm_start_kmeans_s"] for row in rows],
        "poeem embed + encode + export": [poeem_build_s(row) for row in rows],
        "FAISS train + add": [faiss_build_s(row) for row in rows],
        "1,000 searches, nprobe 16 (poeem)": [row["search_ms_per_query"]["poeem@16"] for row in rows],
    }
    for label, values in curves.items():
        points = [(x, v) for x, v in zip(n, values, strict=True) if v is not None]
        ax.loglog(*zip(*points, strict=True), marker="o", label=label)
    ax.set_xlabel("items in the catalogue")
    ax.set_ylabel("seconds")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(img / "scale.png", dpi=120)
    plt.close(fig)
    return [*lines, "", "![cost against catalogue size](img/scale.png)", "", provenance(r), ""]


def sparse_tables_section(r: dict[str, Any]) -> list[str]:
    """Quality and epoch time with dense and sparse id-table optimizers."""
    dense = r["dense_optimizer"]
    lines = [
        f"### {r['dataset']}, row-wise Adagrad at lr {r['rowwise_adagrad_lr']}",
        "",
        f"{r['headline']}, mean ± std over seeds; dense = {dense['name']} at lr {dense['lr']} on every "
        f"parameter (the preset); the sparse rows keep it for everything but the id tables "
        f"(row-wise Adagrad at lr {r['rowwise_adagrad_lr']}; SparseAdam at the preset's lr"
        + (
            "; `_bf16`: the tables stored in bfloat16, updated with stochastic rounding)."
            if any(e["table_optimizer"].endswith("_bf16") for e in r["summary"])
            else ")."
        ),
        "",
        "| id tables | model | seeds | exact | poeem nprobe 1 | poeem all lists | s/epoch |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for e in r["summary"]:

        def cell(key: str, e: dict[str, Any] = e) -> str:
            matches = [k for k in e if k.endswith(key) and not k.endswith("_std")]
            return f"{e[matches[0]]:.4f} ± {e[matches[0] + '_std']:.4f}" if matches else "-"

        lines.append(
            f"| {e['table_optimizer']} | {e['model']} | {e['seeds']} | {cell('exact')} | {cell('@1')} "
            f"| {cell('@all')} | {e['train_s_per_epoch']:.1f} |"
        )
    return [*lines, "", provenance(r), ""]


def trained_codes_section(r: dict[str, Any]) -> list[str]:
    """The index as trained, with kept lists (the default export), and re-encoded: quality and
    export time."""
    h, b = r["headline"], r["budget"]

    def by_seed(key: str) -> str:
        return ", ".join(f"{run[key]:.0%}" for run in r["runs"])

    lines = [
        f"### {r['dataset']}, {b['bytes_per_item']:g} bytes per item (IVF{b['coarse_K']},PQ{b['D']}, "
        f"K={b['K']}), variant `{r['variant']}`",
        "",
        f"{h}, mean ± std over seeds; the same trained model in every row. Items with codes "
        f"identical to a re-encoding: {by_seed('same_codes')} (lists: {by_seed('same_list')}), by seed.",
        "",
        "| export | nprobe | seeds | " + h + " | export s |",
        "|---|---:|---:|---:|---:|",
    ]
    for e in r["summary"]:
        lines.append(
            f"| {e['mode']} | {e['nprobe']} | {e['seeds']} | {e[h]:.4f} ± {e[h + '_std']:.4f} "
            f"| {e['export_s']:.2f} |"
        )
    return [*lines, "", provenance(r), ""]


def text_section(r: dict[str, Any]) -> list[str]:
    c = r["config"]
    lines = [
        f"## Text retrieval: SciFact (all-MiniLM-L6-v2), {' and '.join(map(str, c['budgets']))} bytes, "
        f"layer rotations {', '.join(c['rotations'])}",
        "",
        f"{r['data']}. Evaluated on the test judgements; trained rows use the train judgements, "
        f"mode `{c['mode']}` (the query encoder fine-tunes; documents are embedded once by the frozen "
        f"encoder, then pass a trained head and, for poeem, the layer), {c['epochs']} epochs of batch "
        f"{c['batch_size']} plus {c['random_negatives']} random negative documents, seeds "
        f"{', '.join(map(str, c['seeds']))}. Indexes are PQ without IVF (5,183 documents need no lists): "
        "48 bytes per document is PQ48x8 (32x smaller than 384 float32), 16 bytes PQ16x8; the RQ "
        "rows (FAISS RQ, poeem RQ fit, the layer trained with rotation rq) are RQ16x8 or RQ48x8 at "
        "the same bytes. 'share' is the share of the same model's own exact ndcg@10.",
        "",
        "| method | ndcg@10 | share | recall@100 | train s | index build s | index bytes |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    exact = {}
    for row in r["rows"]:
        if row["method"].endswith("exact"):
            exact[row["method"].split(" exact")[0]] = row["ndcg@10"]

    def cell(row: dict[str, Any], key: str) -> str:
        if key not in row:
            return ""
        std = row.get(f"{key}_std", 0.0)
        return f"{row[key]:.4f}" + (f" ± {std:.4f}" if row.get("seeds", 1) > 1 else "")

    for row in r["rows"]:
        name = row["method"]
        own = next((v for k, v in exact.items() if name.startswith(k)), None)
        share = f"{row['ndcg@10'] / own:.1%}" if own else ""
        size = f"{row['index_bytes']:,.0f}" if "index_bytes" in row else ""
        train = f"{row['train_s']:.0f}" if row.get("train_s") else ""
        build = f"{row['build_s']:.2f}" if "build_s" in row else ""
        lines.append(
            f"| {name} | {cell(row, 'ndcg@10')} | {share} | {cell(row, 'recall@100')} | {train} | {build} | "
            f"{size} |"
        )
    if any(row["method"] == "bm25" for row in r["rows"]):
        lines += [
            "",
            "Published BM25 on BEIR SciFact (Elasticsearch): ndcg@10 0.665. The bm25 row is `bm25s` "
            "with English stop words and Snowball stemming, measured here.",
        ]
    lines += ["", *([r["note"], ""] if r.get("note") else []), provenance(r), ""]
    return lines


def index_description(r: dict[str, Any]) -> str:
    """The load test's index: synthetic, or an exported one (built as the notes below say)."""
    if r["config"].get("index_dir"):
        return f"the exported index `{r['config']['index_dir']}` (how it was built: the notes at the end)"
    return r["index"]


def serve_section(r: dict[str, Any]) -> list[str]:
    lines = [
        "## Serving: `poeem serve` under load",
        "",
        f"Index: {index_description(r)} ({r['items']:,} items), top-{r['config']['k']}, nprobe 1, "
        f"{r['config'].get('workers', 1)} server worker(s), {r['config'].get('search_threads', 1)} "
        "search thread(s) each. "
        "Each level sends a "
        "fixed number of requests from keep-alive HTTP clients on 127.0.0.1; the same searches then run "
        "in process (`IndexService.search`, no HTTP) from as many threads. Clients and server share "
        "the machine's cores.",
        "",
        "| batch | clients | req/s | queries/s | p50 ms | p99 ms | failed | in-process queries/s "
        "| service / in-process |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in r["rows"]:
        sv = row["service"]
        cells = [
            row["batch"],
            row["clients"],
            f"{sv['requests_per_s']:,.0f}",
            f"{row['queries_per_s_service']:,.0f}",
            f"{sv['p50_ms']:.1f}",
            f"{sv['p99_ms']:.1f}",
            sv["failures"],
            f"{row['queries_per_s_in_process']:,.0f}",
            f"{row['service_over_in_process']:.2f}",
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    side = [s for row in r["rows"] for s in row["reload_and_add_statuses"]]
    lines += [
        "",
        f"A reload and an add were sent during the 8-client batch-1 level (statuses {side}); failed "
        f"requests over the whole run: {r['total_failures']}.",
        "",
        provenance(r),
        "",
    ]
    return lines


def update_cost_section(r: dict[str, Any]) -> list[str]:
    lines = add_cost_lines(r) if "quiet" in r else []
    return lines + (remove_cost_lines(r["removes"]) if "removes" in r else [])


def add_cost_lines(r: dict[str, Any]) -> list[str]:
    quiet, loaded, compaction = r["quiet"], r["under_search_load"], r["compaction"]
    search = loaded["search"]
    lines = [
        "## Updates: what adding one item costs (segments)",
        "",
        f"A synthetic index of {r['items']:,} items (dim 64, IVF16,PQ8x8, cosine; "
        f"{r['index_bytes'] / 1e6:.1f} MB on disk) served by `poeem serve` (1 worker). Each "
        "`POST /items` adds one item: it writes a segment file and the manifest. The bytes are "
        "every file an add created or changed.",
        "",
        "| phase | adds | failed | p50 ms | p99 ms | max ms | bytes written per add (mean / max) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in (("quiet server", quiet), (f"{loaded['search_clients']} clients searching", loaded)):
        lines.append(
            f"| {name} | {row['adds']} | {row['failures']} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} | "
            f"{row['max_ms']:.1f} | {row['bytes_written_mean']:,.0f} / {row['bytes_written_max']:,} |"
        )
    lines += [
        "",
        f"The searches beside the second phase: {search['requests']:,} batch-1 requests, "
        f"{search['requests_per_s']:,.0f}/s, p50 {search['p50_ms']:.1f} ms, p99 {search['p99_ms']:.1f} ms, "
        f"{search['failures']} failed. Folding the {compaction['segments']} segments into a new base "
        f"(`poeem compact`, which every update did before segments existed) wrote "
        f"{compaction['bytes_written'] / 1e6:.1f} MB in {compaction['seconds']:.2f} s.",
        "",
        provenance(r),
        "",
    ]
    return lines


def remove_cost_lines(r: dict[str, Any]) -> list[str]:
    cpus = r.get("cpus", [])
    pinned = f" on CPU {cpus[0]} alone" if len(cpus) == 1 else ""
    lines = [
        "## Updates: what removed items cost a search",
        "",
        f"{r['items']:,} random vectors (dim {r['dim']}, {r['bytes_per_item']} bytes per item: 16 x 4-bit "
        f"PQ codes, fast scan), inner product, k={r['k']}, {r['threads']} thread{pinned}. A share of the "
        "items is removed (tombstones; compaction held off). FAISS takes no id selector for a flat "
        "fast-scan index: it fetches (k + 3 sqrt(k p) + 1) / (1 - p) results per query (p the removed "
        "share), drops the removed ones, and searches again only a query left short. The IVF index "
        "skips removed ids while it scans (FAISS `IDSelector`). 'Before' fetched k plus every "
        "removed id. One query per call: the median over "
        f"{r['queries']} queries; in one call: all {r['queries']}. Best of the passes, which take "
        "turns. 'Same as rebuilt': queries whose top-10 scores equal those of an index rebuilt "
        "from the live items, and whose ids do above the 10th score.",
        "",
        "| index | removed | filter | ms, one query per call | vs none removed | ms per query, in one call "
        "| before: ms, one query per call | same as rebuilt (scores / ids) |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    none = {row["index"]: row["ms_one_query"] for row in r["rows"] if row["removed"] == 0}
    for row in r["rows"]:
        before = row.get("ms_one_query_fetch_all_removed")
        ratio = row["ms_one_query"] / none[row["index"]]
        lines.append(
            f"| {row['index']} (nprobe {row['nprobe']}) | {row['removed']:,} ({row['removed_share']:.0%}) "
            f"| {row['filter']} | {row['ms_one_query']:.3f} | {ratio:.2f}x "
            f"| {row['ms_per_query_batch']:.3f} | {f'{before:.3f}' if before is not None else '—'} "
            f"| {row['same_scores_as_rebuilt']:.0%} / {row['same_ids_as_rebuilt']:.0%} |"
        )
    return [*lines, "", provenance(r), ""]


def distill_section(name: str, r: dict[str, Any], img: Path) -> list[str]:
    b = r["budget"]
    nbytes = b["num_subspaces"] * (1 if b["codebook_size"] == 256 else 0.5)
    lists = f"IVF{b['num_coarse']}," if b["num_coarse"] else ""
    lines = [
        f"### Distillation: {r['dataset']}",
        "",
        f"{lists}PQ{b['num_subspaces']}x{int(np.log2(b['codebook_size']))} ({nbytes:g} bytes per item), "
        f"{r['metric']}, mean of seeds {r['seeds']} (std in brackets). Above the joint rows the "
        "embeddings are fixed (a model trained without any index); the distilled rows learn from "
        "the exact ranking of the training queries, without labels.",
        "",
        "| method | nprobe | " + r["metric"] + " | of exact | codes scanned | build s | epochs |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    # merged runs keep their old rows first: exact, FAISS, ScaNN, poeem's fits, then the joint models
    groups = ("exact", "faiss", "scann", "poeem", "joint")
    rows = sorted(r["summary"], key=lambda row: [row["method"].startswith(g) for g in groups].index(True))
    for row in rows:
        score = f"{row['mean']:.4f} ({row['std']:.4f})"
        seconds = np.mean([run["seconds"] for run in r["runs"] if run["method"] == row["method"]])
        scanned = f"{row['codes_scanned']:.0f}" if "codes_scanned" in row else "—"
        seeds = sorted({run["seed"] for run in r["runs"] if run["method"] == row["method"]})
        method = row["method"] + (f" (seeds {seeds})" if seeds != r["seeds"] else "")
        epochs = [run["epochs"] for run in r["runs"] if run["method"] == row["method"] and "epochs" in run]
        lines.append(
            f"| {method} | {row['nprobe']} | {score} | {row['of_exact']:.1%} | {scanned} "
            f"| {seconds:.1f} | {f'{np.mean(epochs):.1f}' if epochs else '—'} |"
        )
    lines += [
        "",
        "Build s: FAISS OPQ (and RQ) train + add, ScaNN build, the layer's fit, and fit + distillation, on "
        "the same embeddings; faiss-opq-distilled and faiss-rq-distilled start from the FAISS OPQ and "
        "RQ indexes (`poeem distill --from-faiss`; the RQ items re-encoded greedily, beam 1). "
        "The joint rows (id data) are other models: the same preset trained with "
        "the layer (default variant: joint; the paper's losses only: joint-paper-losses; a residual "
        "quantizer: joint-rq), each "
        "index as trained and distilled (-distilled); their share of exact is of that model's own "
        "exact search (-exact), and their build s includes its training. -lists-flat rows keep an "
        "index's lists but store the float vectors (IVF-Flat): the ceiling of any code in those lists "
        "(faiss-lists-flat: FAISS's k-means lists, which every FAISS row uses; joint-lists-flat: the "
        "lists the layer trained). Codes scanned: the mean "
        "number of codes a test query scans at that nprobe (its real routing; ScaNN's by counting "
        "the candidates of its probed leaves). Epochs: the distillation epochs run (mean over the "
        "seeds; at most 30, fewer once the held-out loss stops improving; '—' where not recorded). "
        "The -rq rows: the layer with a residual quantizer (`--quantizer rq`) at the same bytes, "
        "fitted (poeem-fit-rq) and distilled.",
    ]
    if b["num_coarse"] and all("codes_scanned" in row for row in r["summary"]):
        lines += ["", distill_scanned_plot(name, r, img)]
    lines += ["", provenance(r), ""]
    return lines


def distill_scanned_plot(name: str, r: dict[str, Any], img: Path) -> str:
    """Every method's metric against the codes a query scans; the exact searches as lines."""
    fig, ax = plt.subplots(figsize=(7, 4))
    methods = [m for m in dict.fromkeys(x["method"] for x in r["summary"]) if not m.endswith("exact")]
    palette = [*plt.cm.tab20.colors, *plt.cm.tab20b.colors]  # one per method, up to 40
    colors = {m: palette[i % len(palette)] for i, m in enumerate(methods)}
    for method in dict.fromkeys(x["method"] for x in r["summary"]):
        rows = [x for x in r["summary"] if x["method"] == method]
        if method.endswith("exact"):
            ax.axhline(rows[0]["mean"], color="k", ls="--" if method == "exact" else ":", lw=1, label=method)
            continue
        pts = sorted((x["codes_scanned"], x["mean"]) for x in rows)
        style = "-" if method.startswith("joint") else "--"  # joint models solid, fixed embeddings dashed
        ax.plot(*zip(*pts, strict=True), style, marker="o", ms=3, color=colors[method], label=method)
    legend = {"fontsize": 6, "loc": "center left", "bbox_to_anchor": (1.0, 0.5)}  # beside the plot
    save_scanned_plot(fig, ax, r["metric"], img / f"{name}_scanned.png", **legend)
    return f"![{r['metric']} against codes scanned per query, every method](img/{name}_scanned.png)"


def save_scanned_plot(fig: Any, ax: Any, metric: str, path: Path, **legend: Any) -> None:
    """Label a metric-against-codes-scanned plot (log x axis), draw its legend, save and close it."""
    ax.set_xlabel("codes scanned per query (mean, real routing)")
    ax.set_ylabel(metric)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.legend(**legend)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_qps_plot(fig: Any, ax: Any, r: dict[str, Any], title: str, path: Path) -> None:
    """Finish a recall-against-queries-per-second plot of the frontier result ``r`` (its exact
    search as a line, a log QPS axis) and write it to ``path``."""
    ax.axhline(r["exact"]["recall"], color="grey", ls="--", lw=1, label="exact (floats)")
    ax.set_xscale("log")
    ax.set_xlabel("queries per second (1 thread, whole query set at once)")
    ax.set_ylabel(r["headline"])
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


FRONTIER_LABELS = {
    "poeem": "poeem, the default (K=16, fast scan)",
    "poeem-distilled": "poeem, distilled (--distill-epochs 10)",
    "poeem-k256": "poeem K=256, as trained",
    "poeem-refit": "poeem refit (--refit rq)",
    "poeem-distill-items": "poeem distill --items (defaults)",
    "faiss-ivfpq": "FAISS IVF-PQ",
    "faiss-ivfpq-fastscan": "FAISS IVF-PQ fast scan",
    "faiss-opq-ivfpq": "FAISS OPQ + IVF-PQ",
    "faiss-ivfrq": "FAISS IVF-RQ",
    "scann-lut256": "ScaNN AH lut256",
    "scann-lut16": "ScaNN AH lut16",
    "hnsw": "FAISS HNSW32 (floats)",
    "poeem-rerank-sq8": "poeem --rerank sq8",
    "poeem-rerank-fp16": "poeem --rerank fp16",
    "faiss-ivfpq-refine-sq8": "FAISS IVF-PQ + Refine(SQ8)",
    "faiss-ivfpq-fastscan-refine-sq8": "FAISS IVF-PQ fast scan + Refine(SQ8)",
    "faiss-ivfpq-fastscan-refine-fp16": "FAISS IVF-PQ fast scan + Refine(SQfp16)",
    "scann-lut16-reorder-int8": "ScaNN AH lut16 + int8 reorder",
    "scann-lut16-reorder-bf16": "ScaNN AH lut16 + bfloat16 reorder",
}


MATCH_QPS = 0.8  # a peer point is matched by a setting at least as accurate and this share as fast


def best_recall_at(rows: list[dict[str, Any]], qps: float) -> float | None:
    """The best recall of ``rows`` at ``qps`` queries per second or faster (None: none is as fast)."""
    fast = [r["recall"] for r in rows if r["qps"] >= qps]
    return max(fast) if fast else None


def verdict(r: dict[str, Any]) -> list[str]:
    """Each poeem index against every peer point at its bytes that reaches half of exact recall
    (matched: the poeem index is as accurate at some setting at least :data:`MATCH_QPS` as
    fast), its recall at the speed where FAISS IVF-PQ reaches its best, its build time against
    training's, and its largest list against FAISS IVF-PQ's."""
    rows, half = r["rows"], r["exact"]["recall"] / 2
    train = r.get("train_s", {})
    lines = [
        "| poeem index | peer points matched | at FAISS IVF-PQ's best | build s | of training "
        "| largest list |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    ivfpq = [x for x in rows if x["method"] == "faiss-ivfpq"]
    top = max(ivfpq, key=lambda x: (x["recall"], x["qps"])) if ivfpq else None
    worst_lines = []
    for method in dict.fromkeys(x["method"] for x in rows if x["method"].startswith("poeem")):
        ours = [x for x in rows if x["method"] == method]
        size = ours[0]["bytes_per_item"]
        peers = [
            x
            for x in rows
            if not x["method"].startswith("poeem") and x["bytes_per_item"] == size and x["recall"] >= half
        ]
        missed = [x for x in peers if (best_recall_at(ours, MATCH_QPS * x["qps"]) or -1) < x["recall"]]
        at_top = best_recall_at(ours, top["qps"]) if top else None
        ratio = f"{at_top:.4f} ({at_top / top['recall']:.2f}x)" if at_top is not None and top else "-"
        trained = train.get("poeem-k256" if method in ("poeem-k256", "poeem-refit") else method)
        share = f"{ours[0]['build_s'] / trained:.1%}" if trained and method != "poeem-distill-items" else "-"
        label = FRONTIER_LABELS.get(method, method)
        matched = f"{len(peers) - len(missed)} of {len(peers)}"
        largest = f"{ours[0]['largest_list']:.0f}" if "largest_list" in ours[0] else "-"
        lines.append(f"| {label} | {matched} | {ratio} | {ours[0]['build_s']:.2f} | {share} | {largest} |")
        if missed:
            worst = max(missed, key=lambda x: x["recall"] - (best_recall_at(ours, MATCH_QPS * x["qps"]) or 0))
            mine = best_recall_at(ours, MATCH_QPS * worst["qps"])
            worst_lines.append(
                f"{label} misses {FRONTIER_LABELS.get(worst['method'], worst['method'])} at "
                f"{worst['setting']} by the most ({worst['recall']:.4f} at {worst['qps']:.0f} queries/s, "
                "against " + (f"{mine:.4f}" if mine is not None else "no point of its own fast enough") + ")."
            )
    if top:
        lines += [
            "",
            f"FAISS IVF-PQ's best: {top['recall']:.4f} at {top['qps']:.0f} queries/s ({top['setting']}); "
            "a peer point counts if it reaches half of exact recall or more, and is matched by a "
            f"setting as accurate at {MATCH_QPS:.0%} of its speed or more"
            + (
                f"; FAISS IVF-PQ's largest list holds {top['largest_list']:.0f} items. "
                if "largest_list" in top
                else ". "
            )
            + " ".join(worst_lines),
        ]
    return [*lines, ""]


def frontier_section(name: str, r: dict[str, Any], img: Path) -> list[str]:
    """Recall against queries per second at equal bytes: the plot and each method's front."""
    h, rows = r["headline"], r["rows"]
    methods = list(dict.fromkeys(x["method"] for x in rows))
    colors = plt.get_cmap("tab20")  # more methods than the default cycle's 10 colours
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for i, method in enumerate(methods):
        points = sorted((x for x in rows if x["method"] == method), key=lambda x: x["qps"])
        best = pareto_front(points)
        style = {"lw": 2.5, "color": "black"} if points[0]["default"] else {"lw": 1.2, "color": colors(i)}
        line = ax.plot(
            [x["qps"] for x in best],
            [x["recall"] for x in best],
            marker="os^vD<>px*"[i % 10],
            ms=4,
            label=FRONTIER_LABELS.get(method, method),
            **style,
        )[0]
        others = [x for x in points if x not in best]
        ax.scatter(
            [x["qps"] for x in others], [x["recall"] for x in others], s=8, color=line.get_color(), alpha=0.4
        )
    save_qps_plot(
        fig, ax, r, f"{r['dataset']}: {r['num_items']} items, {r['lists']} lists", img / f"{name}.png"
    )
    bytes_ = next(x["bytes_per_item"] for x in rows if x["method"] != "hnsw")
    seeds = r.get("seeds", [0])
    lines = [
        f"### {r['dataset']}, {bytes_:g} bytes per item: {h} against queries per second",
        "",
        f"{r['num_items']} items, {r['lists']} lists for every IVF method ({r['lists_rule']}); "
        f"mean over {len(seeds)} seed{'s' if len(seeds) > 1 else ''}. Exact search: {h} "
        f"{r['exact']['recall']:.4f} at {r['exact']['qps']:.0f} queries/s. Each method's line is its "
        "Pareto front (faint points: its other settings).",
        "",
        f"![{h} against queries per second](img/{name}.png)",
        "",
    ]
    lines += verdict(r)
    lines += [
        f"| method | bytes/item | front: setting | {h} | queries/s | build s |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for method in methods:
        for x in pareto_front([y for y in rows if y["method"] == method]):
            lines.append(
                f"| {FRONTIER_LABELS.get(method, method)} | {x['bytes_per_item']:.4g} | {x['setting']} | "
                f"{fmt(x, 'recall')} | {x['qps']:.0f} | {x['build_s']:.2f} |"
            )
    train = ", ".join(f"{k} {v:.0f} s" for k, v in r.get("train_s", {}).items() if not k.endswith("_std"))
    lines += ["", f"Training time: {train}.", "", provenance(r), ""]
    return lines


def rerank_section(name: str, r: dict[str, Any], img: Path) -> list[str]:
    """The re-ranking group: recall against queries per second, each method at its own bytes
    (codes plus kept vectors), and how poeem's re-ranking fares against the peers."""
    h, rows, exact = r["headline"], r["rows"], r["exact"]["recall"]
    methods = list(dict.fromkeys(x["method"] for x in rows))
    colors = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for i, method in enumerate(methods):
        points = sorted((x for x in rows if x["method"] == method), key=lambda x: x["qps"])
        best = pareto_front(points)
        style = (
            {"lw": 2.5, "color": "black"} if method == "poeem-rerank-sq8" else {"lw": 1.2, "color": colors(i)}
        )
        dashed = {} if any(",F=" in x["setting"] for x in points) else {"ls": "--"}  # codes alone
        label = f"{FRONTIER_LABELS.get(method, method)} ({points[0]['bytes_per_item']:g} B)"
        ax.plot(
            [x["qps"] for x in best],
            [x["recall"] for x in best],
            marker="os^vD<>px*"[i % 10],
            ms=4,
            label=label,
            **style,
            **dashed,
        )
    title = f"{r['dataset']}: re-ranking, {r['num_items']} items, {r['lists']} lists"
    save_qps_plot(fig, ax, r, title, img / f"{name}.png")
    grid = r.get("rerank", {})
    lines = [
        f"### {r['dataset']}: {h} against queries per second, with re-ranking",
        "",
        f"{r['num_items']} items, {r['lists']} lists. Each method keeps its codes and, where it "
        "re-ranks, each item's vector (bytes per item = codes + vectors); F is the candidates "
        f"re-scored per result (F k), swept over {grid.get('factors')} times nprobe up to "
        f"{grid.get('max_nprobe')}. Dashed lines: codes alone. Exact search: {h} {exact:.4f} at "
        f"{r['exact']['qps']:.0f} queries/s.",
        "",
        f"![{h} against queries per second, with re-ranking](img/{name}.png)",
        "",
    ]
    ivfpq = [x for x in rows if x["method"] == "faiss-ivfpq"]
    top = max(ivfpq, key=lambda x: (x["recall"], x["qps"])) if ivfpq else None
    lines += [
        "| poeem index | bytes/item | at FAISS IVF-PQ's best speed: "
        + h
        + " (of exact) | peer points matched |",
        "|---|---:|---:|---:|",
    ]
    for method in (m for m in methods if m.startswith("poeem")):
        ours = [x for x in rows if x["method"] == method]
        size = ours[0]["bytes_per_item"]
        peers = [
            x
            for x in rows
            if not x["method"].startswith("poeem")
            and x["bytes_per_item"] == size
            and x["recall"] >= exact / 2
        ]
        matched = sum((best_recall_at(ours, x["qps"]) or -1) >= x["recall"] for x in peers)
        at_top = best_recall_at(ours, top["qps"]) if top else None
        reached = f"{at_top:.4f} ({at_top / exact:.1%})" if at_top is not None else "-"
        lines.append(
            f"| {FRONTIER_LABELS.get(method, method)} | {size:g} | {reached} | {matched} of {len(peers)} |"
        )
    if top:
        lines += [
            "",
            f"FAISS IVF-PQ without re-ranking reaches its best, {top['recall']:.4f} "
            f"({top['recall'] / exact:.1%} of exact), at {top['qps']:.0f} queries/s ({top['setting']}). A "
            "peer point (same bytes, at least half of exact) is matched where the poeem index is as "
            "fast and as accurate at some setting.",
        ]
    lines += [
        "",
        f"| method | bytes/item | front: setting | {h} | of exact | queries/s |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for method in methods:
        for x in pareto_front([y for y in rows if y["method"] == method]):
            lines.append(
                f"| {FRONTIER_LABELS.get(method, method)} | {x['bytes_per_item']:g} | {x['setting']} | "
                f"{fmt(x, 'recall')} | {x['recall'] / exact:.1%} | {x['qps']:.0f} |"
            )
    return [*lines, "", provenance(r), ""]


def rerank_cost_section(r: dict[str, Any]) -> list[str]:
    """What re-scoring costs beside the codes' search (benchmarks/rerank_cost.py)."""
    lines = [
        "### What re-scoring costs",
        "",
        f"A synthetic index of Gowalla's shape ({r['items']} items, dim {r['dim']}, {r['lists']} lists, "
        f"{r['index']}), {r['queries']} queries, k = {r['k']}, nprobe {r['nprobe']}, one thread: the "
        f"codes' search, the codes' search for the {r['candidates']} candidates re-ranking needs, the "
        "re-scoring of those candidates alone, and the whole re-ranked search; ms per query with every "
        "query in one call (latency: one query per call, median).",
        "",
        "| vectors | bytes/item | codes' search | for the candidates | re-scoring | re-ranked search "
        "| re-scoring / codes' search |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in r["rows"]:
        cells = [
            f"{row[key]['batch_ms']:.4f} ({row[key]['latency_ms']:.4f})"
            for key in ("codes", "candidates", "rescore", "reranked")
        ]
        share = f"{row['rescore_share_batch']:.0%} ({row['rescore_share_latency']:.0%})"
        lines.append(f"| {row['precision']} | {row['vector_bytes']} | " + " | ".join(cells) + f" | {share} |")
    return [*lines, "", provenance(r), ""]


def fmt_optional(value: float | None, digits: int) -> str:
    """A number, or "-" where it was not measured."""
    return "-" if value is None else f"{value:.{digits}f}"


def fmt(row: dict[str, Any], key: str) -> str:
    std = row.get(f"{key}_std", 0.0)
    return f"{row[key]:.4f} ± {std:.4f}" if row.get("seeds", 1) > 1 else f"{row[key]:.4f}"


def recall_section(name: str, r: dict[str, Any], img: Path) -> list[str]:
    h = r["headline"]
    metrics = [h] + [k for k in ("recall@50", "recall@100", "ndcg@20") if k in r["summary"][0] and k != h]
    b = r["budget"]
    budget = f"IVF{b['coarse_K']},PQ{b['D']}x{b['K'].bit_length() - 1}"
    lines = [
        f"## Retrieval quality: {r['dataset']}, {budget}",
        "",
        f"{r['data']}. Code budget {budget} ({b['bytes_per_item']:g} bytes per item plus the list id); "
        "mean ± std over the seeds in the 'seeds' column. 'codes scanned' is the mean number of "
        "item codes a query scans at that nprobe (its real routing); 'eval ms/query' is the "
        "measured time of the whole evaluation (search of the top 100, masking of training items, "
        "metrics) per query. Rows without them were measured before they were recorded. "
        "faiss-rq and poeem-rq code the residual with a residual quantizer of the same bytes "
        "(D stages of K codewords over all coordinates) in place of PQ; poeem-ip-refit-rq is "
        "poeem-ip with its coder refitted after training as such a residual quantizer in the "
        "trained lists, then distilled (`poeem train --refit rq`; its build s are "
        "the refit and the distillation); the other poeem rows serve the index as trained "
        "(`--refit none`).",
        "",
        "| row | nprobe | seeds | "
        + " | ".join(metrics)
        + " | codes scanned | eval ms/query | index build s |",
        "|---|---:|---:|" + "---:|" * len(metrics) + "---:|---:|---:|",
    ]
    nq = r.get("num_eval_queries")
    for row in r["summary"]:
        scanned = f"{row['codes_scanned']:.0f}" if "codes_scanned" in row else "—"
        ms = f"{1000 * row['eval_s'] / nq:.3f}" if nq and "codes_scanned" in row else "—"
        lines.append(
            f"| {row['method']} | {row['nprobe']} | {row['seeds']} | "
            + " | ".join(fmt(row, m) for m in metrics)
            + f" | {scanned} | {ms} | {row['build_s']:.2f} |"
        )
    per_variant: dict[str, list[float]] = {}
    for run in r["runs"]:
        per_variant.setdefault(run["variant"], []).append(run["train_s_per_epoch"])
    t = {k: float(np.median(v)) for k, v in per_variant.items()}  # robust to one disturbed run
    lines += [
        "",
        "Training time per epoch, median over seeds (s): "
        + ", ".join(f"{k} {v:.1f}" for k, v in t.items())
        + ". The rows come from different commands, threads and load (see the commands); "
        "benchmarks/train_cost.py measures the cost of a step alone.",
        "",
    ]
    if r["dataset"] == "gowalla":
        exact = next(x for x in r["summary"] if x["method"] == "exact")
        lines += [
            "Our un-quantized base model against published numbers on this split (recall@20): ours "
            f"{exact['recall@20']:.4f}; " + "; ".join(f"{k} {v}" for k, v in PUBLISHED_GOWALLA.items()) + ".",
            "",
        ]
    lines += plots(name, r, img)
    lines += [provenance(r), ""]
    return lines


def plots(name: str, r: dict[str, Any], img: Path) -> list[str]:
    out = []
    h = r["headline"]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for method in dict.fromkeys(x["method"] for x in r["summary"]):
        pts = [(x["nprobe"], x[h]) for x in r["summary"] if x["method"] == method]
        if method == "exact":
            ax.axhline(pts[0][1], color="k", ls="--", lw=1, label="exact")
        else:
            ax.plot(*zip(*pts, strict=True), marker="o", label=method)
    ax.set_xlabel("nprobe")
    ax.set_ylabel(h)
    ax.set_xscale("log", base=2)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(img / f"{name}_nprobe.png", dpi=120)
    plt.close(fig)
    out.append(f"![{h} against nprobe](img/{name}_nprobe.png)")
    scanned = [x for x in r["summary"] if "codes_scanned" in x and x["method"] != "exact"]
    if scanned:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for method in dict.fromkeys(x["method"] for x in scanned):
            pts = sorted((x["codes_scanned"], x[h]) for x in scanned if x["method"] == method)
            ax.plot(*zip(*pts, strict=True), marker="o", label=method)
        exact = next(x for x in r["summary"] if x["method"] == "exact")
        ax.axhline(exact[h], color="k", ls="--", lw=1, label="exact")
        save_scanned_plot(fig, ax, h, img / f"{name}_scanned.png", fontsize=7)
        out.append(f"![{h} against codes scanned per query](img/{name}_scanned.png)")
    if r.get("curves"):
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
        for key, ax in zip(("relative_distortion", "subcode_perplexity"), axes, strict=True):
            if key in r["curves"]:
                ax.plot(*zip(*r["curves"][key], strict=True), label=key)
            if key == "subcode_perplexity" and "coarse_perplexity" in r["curves"]:
                ax.plot(*zip(*r["curves"]["coarse_perplexity"], strict=True), label="coarse_perplexity")
            ax.set_xlabel("training step")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(img / f"{name}_training.png", dpi=120)
        plt.close(fig)
        out.append(f"![distortion and code-usage perplexity over training](img/{name}_training.png)")
    if r.get("list_sizes"):
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for label, sizes in r["list_sizes"].items():
            ax.bar([f"{i}" for i in range(len(sizes))], sorted(sizes, reverse=True), alpha=0.5, label=label)
        ax.set_xlabel("inverted list (sorted by size)")
        ax.set_ylabel("items")
        ax.set_xticks([])
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(img / f"{name}_lists.png", dpi=120)
        plt.close(fig)
        out.append(f"![coarse list sizes](img/{name}_lists.png)")
    return [*out, ""]


def sweep_section(r: dict[str, Any], img: Path) -> list[str]:
    h = r["headline"]
    lines = [
        "## Parameter sweeps (RQ2)",
        "",
        f"{r['data']}; {h} at nprobe 1 and over all lists.",
        "",
        "| parameter | value | bytes/item | faiss-ivfpq | poeem | faiss (all lists) | poeem (all lists) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for p in r["points"]:
        lines.append(
            f"| {p['parameter']} | {p['value']} | {p['bytes_per_item']:g} | {p['faiss'][0]:.4f} | "
            f"{p['poeem'][0]:.4f} | {p['faiss'][1]:.4f} | {p['poeem'][1]:.4f} |"
        )
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, param in zip(axes, ("D", "K", "coarse_K"), strict=True):
        pts = [p for p in r["points"] if p["parameter"] == param]
        xs = [p["bytes_per_item"] if param != "coarse_K" else p["value"] for p in pts]
        ax.plot(xs, [p["faiss"][0] for p in pts], marker="o", label="faiss-ivfpq")
        ax.plot(xs, [p["poeem"][0] for p in pts], marker="o", label="poeem")
        ax.axhline(r["exact"], color="k", ls="--", lw=1, label="exact")
        ax.set_xlabel("bytes per item" if param != "coarse_K" else "coarse_K")
        ax.set_title(f"varying {param}")
        ax.set_ylabel(h)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(img / "sweep.png", dpi=120)
    plt.close(fig)
    return [*lines, "", "![recall against bytes per item](img/sweep.png)", "", provenance(r), ""]


def train_cost_section(r: dict[str, Any]) -> list[str]:
    """Tables of ``benchmarks/train_cost.py``: steps/s without the layer and with it, per batch
    size, budget and thread count, and where a profiled step's time goes."""
    lines = [
        f"### Training cost: {r['dataset']}",
        "",
        "Training steps per second on the preset's batches, every timed step quantizing; the median "
        "of the runs, which take turns with the other settings.",
        "",
        "`code` names the library version measured (`earlier`: the same script run on an earlier "
        "commit, named in the command).",
        "",
        "| batch | torch threads | budget | code | setting | steps/s | time per step vs no layer |",
        "|---:|---:|---|---|---|---:|---:|",
    ]
    runs = sorted(
        r["runs"], key=lambda x: (x["threads"], x["budget"], x["batch_size"], x.get("code") != "earlier")
    )
    for x in runs:
        ratio = f"{x['time_vs_no_layer']:.2f}x" if "time_vs_no_layer" in x else ""
        lines.append(
            f"| {x['batch_size']} | {x['threads']} | {x['budget']} | {x.get('code', 'current')} "
            f"| {x['setting']} | {x['steps_per_s']:.1f} | {ratio} |"
        )
    profiled = [x for x in runs if "profile_ms" in x]
    if profiled:
        parts = list(dict.fromkeys(p for x in profiled for p in x["profile_ms"]))
        lines += [
            "",
            "Where a profiled step's time goes, ms per step (`--profile`; the parts nest: the "
            "layer's forward holds the rotation, the assignment, the reconstruction and the trained "
            "codes, and `backward` is autograd's whole pass):",
            "",
            "| batch | threads | budget | code | setting | " + " | ".join(parts) + " |",
            "|---:|---:|---|---|---|" + "---:|" * len(parts),
        ]
        for x in profiled:
            cells = " | ".join(f"{x['profile_ms'][p]:.2f}" if p in x["profile_ms"] else "" for p in parts)
            where = f"| {x['batch_size']} | {x['threads']} | {x['budget']} | {x.get('code', 'current')} "
            lines.append(f"{where}| {x['setting']} | {cells} |")
    return [*lines, "", provenance(r), ""]


ABLATION_COLUMNS = (
    ("nprobe1", "nprobe 1"),
    ("all_lists", "all lists"),
    ("exact_of_joint_model", "joint model, exact"),
    ("codes_scanned_nprobe1", "codes scanned, nprobe 1"),
    ("imbalance", "imbalance"),
    ("train_s_per_epoch", "train s/epoch"),
)


def ablation_section(r: dict[str, Any], img: Path) -> list[str]:
    """Table and bar plot of ``benchmarks/ablation.py``: each option alone and together."""
    h, name = r["headline"], r["dataset"]
    lines = [
        f"### Ablation: {name}",
        "",
        f"{h} of the `poeem-ip` variant with each option (mean ± std over the listed seeds). "
        "default: the current defaults, which score the un-quantized items in turn with the "
        "quantized ones; +every-step: both every step (the defaults before that).",
        "",
        "| options | seeds | " + " | ".join(label for _, label in ABLATION_COLUMNS) + " |",
        "|---|---|" + "---:|" * len(ABLATION_COLUMNS),
    ]
    for row in r["summary"]:
        cells = []
        for key, _ in ABLATION_COLUMNS:
            digits = {"nprobe1": 4, "all_lists": 4, "exact_of_joint_model": 4, "imbalance": 3}.get(key, 1)
            digits = 0 if key == "codes_scanned_nprobe1" else digits
            std = f" ± {row[key + '_std']:.{digits}f}" if len(row["seeds"]) > 1 else ""
            cells.append(f"{row[key]:.{digits}f}{std}")
        seeds = ",".join(map(str, row["seeds"]))
        lines.append(f"| {row['option']} | {seeds} | " + " | ".join(cells) + " |")
    fig, ax = plt.subplots(figsize=(7, 3.2))
    labels = [row["option"] for row in r["summary"]]
    ys = np.arange(len(labels))
    ax.barh(ys - 0.2, [row["nprobe1"] for row in r["summary"]], 0.4, label="nprobe 1")
    ax.barh(ys + 0.2, [row["all_lists"] for row in r["summary"]], 0.4, label="all lists")
    ax.set_yticks(ys, labels, fontsize=7)
    ax.set_xlabel(h)
    lo = min(row["nprobe1"] for row in r["summary"])
    ax.set_xlim(lo * 0.95, max(row["exact_of_joint_model"] for row in r["summary"]) * 1.01)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(img / f"ablation_{name}.png", dpi=120)
    plt.close(fig)
    return [*lines, "", f"![ablation on {name}](img/ablation_{name}.png)", "", provenance(r), ""]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--results-dir", type=Path, default=RESULTS)
    p.add_argument("--docs-dir", type=Path, default=DOCS)
    args = p.parse_args()
    img = args.docs_dir / "img"
    img.mkdir(parents=True, exist_ok=True)
    results = load(args.results_dir)
    lines = [
        "# Benchmarks",
        "",
        "Generated by `python benchmarks/report.py` from `benchmarks/results/*.json`; every number "
        "below comes from the command printed under its table. Nothing here is copied from papers "
        "except where marked 'published'.",
        "",
    ]
    frontiers = sorted(
        n for n in results if n.startswith("frontier_") and not n.startswith("frontier_rerank_")
    )
    if frontiers:
        lines += [
            "## Recall against queries per second at equal bytes",
            "",
            "Every index as its users judge it (`benchmarks/frontier.py`): the default (the index "
            "as trained at K=16, exported as 4-bit fast scan, ready when training ends), poeem's "
            "other recipes, and the peers fitted after training on the baseline model's embeddings.",
            "",
        ]
        for name in frontiers:
            lines += frontier_section(name, results[name], img)
    reranked = sorted(n for n in results if n.startswith("frontier_rerank_"))
    if reranked or "rerank_cost" in results:
        lines += [
            "## Re-ranking with kept vectors",
            "",
            "`poeem export --rerank sq8` keeps each item's vector beside its codes and re-scores the "
            "codes' top F k candidates with it (`docs/cli.md`, \"Re-ranking\"), as FAISS's refine and "
            "ScaNN's reorder do (`benchmarks/frontier.py --rerank`).",
            "",
        ]
        for name in reranked:
            lines += rerank_section(name, results[name], img)
        if "rerank_cost" in results:
            lines += rerank_cost_section(results["rerank_cost"])
    if "export_speed" in results:
        lines += export_section(results["export_speed"])
    if "search_speed" in results:
        lines += search_speed_section(results["search_speed"])
    if "backend_agreement" in results:
        lines += backend_agreement_section(results["backend_agreement"])
    if "serve_load" in results:
        lines += serve_section(results["serve_load"])
    if "update_cost" in results:
        lines += update_cost_section(results["update_cost"])
    if "scale" in results:
        lines += scale_section(results["scale"], img, results.get("scale_dense"))
    if "scale_sharded" in results:
        lines += sharding_section(results["scale_sharded"])
    if "table_sharding" in results:
        lines += sharded_recall_section(results["table_sharding"])
    sparse = [
        n
        for n in (
            "sparse_tables_ml-100k",
            "sparse_tables_gowalla",
            "sparse_tables_gowalla_probe",
            "sparse_tables_ml-100k_bf16",
            "sparse_tables_gowalla_bf16",
        )
        if n in results
    ]
    if sparse:
        lines += ["## Sparse id tables: quality", ""]
        for name in sparse:
            lines += sparse_tables_section(results[name])
    trained = [n for n in ("trained_codes_ml-100k", "trained_codes_gowalla") if n in results]
    if trained:
        lines += [
            "## The index as trained: kept codes and lists against re-encoding",
            "",
            "`poeem export --from-training codes` keeps each item's codes from its latest training "
            "step; `--from-training lists` (the default) keeps its list and encodes the residual; "
            "`--from-training none` encodes every item again (`docs/design.md`).",
            "",
        ]
        for name in trained:
            lines += trained_codes_section(results[name])
    for name in sorted(n for n in results if n.startswith("text_scifact")):
        lines += text_section(results[name])
    for name in ("recall_synthetic", "recall_ml-100k", "recall_gowalla", "recall_gowalla_D16"):
        if name in results:
            lines += recall_section(name, results[name], img)
    ablations = [n for n in ("ablation_synthetic", "ablation_ml-100k", "ablation_gowalla") if n in results]
    if ablations:
        lines += ["## Closing the gap to exact search: ablation", ""]
        for name in ablations:
            lines += ablation_section(results[name], img)
    for name in ("train_cost_gowalla", "train_cost_synthetic"):
        if name in results:
            lines += train_cost_section(results[name])
    names = ("distill_scifact", "distill_ml-100k", "distill_gowalla", "distill_synthetic")
    distilled = [n for n in names if n in results]
    if distilled:
        lines += ["## Index distillation", ""]
        for name in distilled:
            lines += distill_section(name, results[name], img)
    if "sweep_gowalla" in results:
        lines += sweep_section(results["sweep_gowalla"], img)
    (args.docs_dir / "benchmarks.md").write_text("\n".join(lines) + "\n")
    print("wrote", args.docs_dir / "benchmarks.md")


if __name__ == "__main__":
    main()
