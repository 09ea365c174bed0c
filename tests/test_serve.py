"""`poeem serve` as a user runs it: a real server process on a free loopback port."""

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import TOKEN, Server, free_port, tiny_config, trained_layer

from poeem import Searcher
from poeem.pipeline import export_run, train_run

DIM = 16


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An index directory exported from a tiny synthetic run (with its query tower)."""
    tmp = tmp_path_factory.mktemp("serve")
    train_run(tiny_config(), tmp / "run")
    export_run(tmp / "run", tmp / "ix")
    return tmp / "ix"


@pytest.fixture
def index_dir(exported: Path, tmp_path: Path) -> Path:
    shutil.copytree(exported, tmp_path / "ix")
    return tmp_path / "ix"


@pytest.fixture
def server(index_dir: Path) -> Iterator[Server]:
    s = Server(index_dir)
    yield s
    s.stop()


def unit(seed: int, n: int = 1) -> list[list[float]]:
    x = np.random.default_rng(seed).normal(size=(n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).tolist()


def test_search_matches_the_searcher_and_excludes(server: Server, index_dir: Path) -> None:
    status, body = server.call(
        "POST", "/search", {"queries": [{"id": 12}, {"embedding": unit(0)[0]}], "k": 5}
    )
    assert status == 200 and body["version"] == 1 and len(body["results"]) == 2
    searcher = Searcher.load(index_dir)
    _, ids = searcher.search(searcher.embed_queries(np.array([12])), 5)
    assert body["results"][0]["ids"] == ids[0].tolist()
    top = body["results"][0]["ids"]
    status, body = server.call("POST", "/search", {"queries": [{"id": 12, "exclude": top[:2]}], "k": 3})
    assert body["results"][0]["ids"] == top[2:5]  # excluded ids removed, the rest shift up


def test_health_ready_info_metrics_docs(server: Server) -> None:
    assert server.call("GET", "/health") == (200, {"status": "ok"})
    status, info = server.call("GET", "/info")
    assert status == 200 and info["items"] == 10_000 and info["metric"] == "cosine" and info["query_tower"]
    assert {"poeem", "faiss", "torch"} <= set(info["versions"])
    server.call("POST", "/search", {"queries": [{"id": 1}]})
    status, text = server.call("GET", "/metrics")
    assert 'poeem_requests_total{endpoint="POST /search",status="200"} 1.0' in text
    assert "poeem_index_items 10000.0" in text and "poeem_request_seconds_bucket" in text
    assert server.call("GET", "/docs")[0] == 200 and server.call("GET", "/openapi.json")[0] == 200


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"queries": [{"id": 1}], "k": 5000}, 400, "k must be between 1 and 1000"),
        ({"queries": [{"id": 1}] * 1025}, 400, "at most 1024 per request"),
        ({"queries": [{"embedding": [0.1, 0.2]}]}, 400, "expected shape (n, 16), got shape (1, 2)"),
        (
            {"queries": [{"id": 123456}]},
            400,
            "query ids: expected ids in [0, 10000), got max 123456. "
            "Fix: pass ids of queries the model was trained on",
        ),
        ({"queries": [{"id": 1.5}]}, 422, "invalid request"),
        ({"queries": [{"id": "abc"}]}, 400, "query ids: expected 64-bit integer ids"),
        ({"queries": [{"id": 1, "embedding": [0.0] * 16}]}, 422, "invalid request"),
        ({"queries": []}, 422, "invalid request"),
        ({"queries": [{"id": 1}], "k": "ten"}, 422, "invalid request"),
    ],
)
def test_bad_requests_get_a_4xx_with_a_clear_json_error(
    server: Server, body: dict, status: int, message: str
) -> None:
    got, answer = server.call("POST", "/search", body)
    assert got == status and message in answer["error"]["message"], answer


def test_a_nan_embedding_is_a_clear_400(server: Server) -> None:
    nan = b'{"queries": [{"embedding": [NaN' + b", 0" * 15 + b"]}]}"
    status, answer = server.call("POST", "/search", raw=nan)
    assert status == 400 and "expected finite values" in answer["error"]["message"]


def test_bodies_over_the_limit_get_413(index_dir: Path) -> None:
    server = Server(index_dir, TOKEN, "--max-body-mb", "0.01")  # 10,485 bytes
    try:
        big = json.dumps({"queries": [{"embedding": [0.5] * 16}] * 200}).encode()  # about 20 KB
        status, answer = server.call("POST", "/search", raw=big)  # declared Content-Length
        assert status == 413 and "over 10485 bytes" in answer["error"]["message"]
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        chunks = (big[i : i + 4096] for i in range(0, len(big), 4096))  # streamed, no length
        conn.request("POST", "/search", chunks, {"content-type": "application/json"}, encode_chunked=True)
        response = conn.getresponse()
        assert response.status == 413 and b"over 10485 bytes" in response.read()
        assert server.call("GET", "/health")[0] == 200  # still serving
    finally:
        server.stop()


def test_writes_need_the_token(server: Server, index_dir: Path) -> None:
    item = {"items": [{"id": 50_000, "embedding": unit(1)[0]}]}
    assert server.call("POST", "/items", item)[0] == 401
    assert server.call("POST", "/items", item, token="wrong-token-0000000000")[0] == 401
    status, body = server.call("POST", "/items", item, token=TOKEN)
    assert status == 200 and body == {"added": 1, "version": 2, "items": 10_001}
    status, body = server.call("POST", "/items", item, token=TOKEN)
    assert status == 400 and "ids not already in the index" in body["error"]["message"]
    status, body = server.call("DELETE", "/items", {"ids": [50_000]}, token=TOKEN)
    assert status == 200 and body["removed"] == 1 and body["version"] == 3
    assert Searcher.load(index_dir).version == 3


def test_without_a_token_writes_are_off(index_dir: Path) -> None:
    server = Server(index_dir, token=None)
    try:
        status, body = server.call(
            "POST", "/items", {"items": [{"id": 1, "embedding": unit(1)[0]}]}, token=TOKEN
        )
        assert status == 403 and "write endpoints are off" in body["error"]["message"]
        status, body = server.call("POST", "/reload")  # re-reads the whole index: a write
        assert status == 403 and "write endpoints are off" in body["error"]["message"]
    finally:
        server.stop()


def test_reload_needs_the_token_when_writes_are_on(server: Server) -> None:
    assert server.call("POST", "/reload")[0] == 401
    assert server.call("POST", "/reload", token=TOKEN)[0] == 200


def test_updates_and_reloads_under_concurrent_searches_never_fail(server: Server, index_dir: Path) -> None:
    failures: list[Any] = []
    done = threading.Event()
    count = [0]

    def client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not done.is_set():
            body = {"queries": [{"id": int(rng.integers(10_000))}, {"embedding": unit(seed)[0]}], "k": 10}
            status, answer = server.call("POST", "/search", body)
            count[0] += 1
            if status != 200 or len(answer["results"][0]["ids"]) != 10:
                failures.append((status, answer))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for i in range(4):
        assert (
            server.call(
                "POST", "/items", {"items": [{"id": 60_000 + i, "embedding": unit(i)[0]}]}, token=TOKEN
            )[0]
            == 200
        )
        assert server.call("POST", "/reload", token=TOKEN)[0] == 200
    other = Searcher.load(index_dir)  # another process publishes a version; the poll picks it up
    other.add(np.array(unit(9)), np.array([70_000]))
    deadline = time.monotonic() + 10
    while server.call("GET", "/info")[1]["version"] != other.version and time.monotonic() < deadline:
        time.sleep(0.1)
    done.set()
    for t in threads:
        t.join()
    assert failures == [] and count[0] > 20
    assert server.call("GET", "/info")[1]["items"] == 10_005


def test_a_corrupt_new_version_is_refused_and_the_old_one_keeps_serving(
    server: Server, index_dir: Path
) -> None:
    manifest_path = index_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["version"] = 2
    manifest["files"]["codes"] = "codes-2.safetensors"  # half-written: the file never arrived
    manifest["sha256"]["codes-2.safetensors"] = "0" * 64
    manifest_path.write_text(json.dumps(manifest))
    status, body = server.call("POST", "/reload", token=TOKEN)
    assert status == 400 and "codes-2.safetensors" in body["error"]["message"]
    time.sleep(0.5)  # the poll sees version 2 on disk too, and must not swap it in
    status, body = server.call("POST", "/search", {"queries": [{"id": 3}], "k": 2})
    assert status == 200 and body["version"] == 1


def test_two_servers_on_one_directory_lose_no_items(index_dir: Path) -> None:
    first, second = Server(index_dir), Server(index_dir)
    try:
        assert (
            first.call("POST", "/items", {"items": [{"id": 80_001, "embedding": unit(1)[0]}]}, token=TOKEN)[0]
            == 200
        )
        # the second server still serves version 1; its write goes through the lock and CAS
        assert (
            second.call("POST", "/items", {"items": [{"id": 80_002, "embedding": unit(2)[0]}]}, token=TOKEN)[
                0
            ]
            == 200
        )
    finally:
        first.stop()
        second.stop()
    final = Searcher.load(index_dir)
    assert final.version == 3 and {80_001, 80_002} <= set(final.tensors.ids.tolist())


def test_a_writer_killed_mid_add_leaves_a_loadable_index(index_dir: Path) -> None:
    server = Server(index_dir)
    items = [{"id": 100_000 + i, "embedding": e} for i, e in enumerate(unit(5, 15_000))]
    payload = {"items": items}
    sender = threading.Thread(target=lambda: server.call("POST", "/items", payload, token=TOKEN))
    sender.start()
    time.sleep(1.0)  # mid-request: parsing, encoding or writing version 2
    server.stop(signal.SIGKILL)
    sender.join()
    loaded = Searcher.load(index_dir)
    assert loaded.version in (1, 2) and loaded.ntotal in (10_000, 25_000)
    restarted = Server(index_dir)
    try:
        assert restarted.call("POST", "/search", {"queries": [{"id": 5}], "k": 3})[0] == 200
    finally:
        restarted.stop()


def test_several_workers_serve_the_same_index(index_dir: Path) -> None:
    server = Server(index_dir, TOKEN, "--workers", "2")
    try:
        for _ in range(6):  # requests spread over both worker processes
            status, body = server.call("POST", "/search", {"queries": [{"id": 7}], "k": 3})
            assert status == 200 and len(body["results"][0]["ids"]) == 3
    finally:
        server.stop()


def test_the_listening_socket_disables_nagle() -> None:
    """Regression: with --workers > 1 every response waited ~44 ms for a delayed ACK, because
    uvicorn's own socket left Nagle's algorithm on. Accepted connections inherit the option."""
    import socket as sockets

    from poeem.serve.app import NoDelayConfig

    sock = NoDelayConfig("poeem.serve.app:app_from_env", host="127.0.0.1", port=free_port()).bind_socket()
    try:
        assert sock.getsockopt(sockets.IPPROTO_TCP, sockets.TCP_NODELAY) == 1
        sock.listen()
        client = sockets.create_connection(sock.getsockname())
        accepted, _ = sock.accept()
        assert accepted.getsockopt(sockets.IPPROTO_TCP, sockets.TCP_NODELAY) == 1
        accepted.close()
        client.close()
    finally:
        sock.close()


def test_json_bodies_need_no_content_type_and_unknown_routes_answer_the_error_shape(server: Server) -> None:
    body = {"queries": [{"id": 12}], "k": 3}
    expected = server.call("POST", "/search", body)
    assert expected[0] == 200
    # urllib, like curl -d, sends form-urlencoded unless told otherwise
    assert server.call("POST", "/search", body, content_type=None) == expected
    assert server.call("POST", "/search", body, content_type="text/plain") == expected
    status, answer = server.call("GET", "/nothing-here")
    assert status == 404 and answer == {"error": {"message": "Not Found"}}
    status, answer = server.call("GET", "/search")
    assert status == 405 and answer == {"error": {"message": "Method Not Allowed"}}


def test_query_features_on_a_tower_without_features_are_a_400(server: Server) -> None:
    status, body = server.call("POST", "/search", {"queries": [{"id": 1, "features": [1.0, 2.0]}]})
    assert status == 400 and "takes no features" in body["error"]["message"]


def test_a_busy_port_is_a_clear_error(index_dir: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "poeem", "serve", str(index_dir), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: --port: expected a port free on 127.0.0.1, got {port} (Address already in use). "
        "Fix: pass another --port, or stop the server already listening there"
    ]


def test_exclusions_are_bounded_per_query_and_nprobe_is_clamped(index_dir: Path) -> None:
    server = Server(index_dir, TOKEN, "--max-exclude", "100", "--max-nprobe", "1")
    try:
        status, body = server.call("POST", "/search", {"queries": [{"id": 1, "exclude": list(range(101))}]})
        assert status == 400 and "at most 100 excluded ids per query" in body["error"]["message"]
        assert server.call("POST", "/search", {"queries": [{"id": 1, "exclude": list(range(100))}]})[0] == 200
        huge = server.call("POST", "/search", {"queries": [{"id": 1}], "nprobe": 10**9})
        assert huge == server.call("POST", "/search", {"queries": [{"id": 1}], "nprobe": 1})
        assert server.call("GET", "/info")[1]["limits"]["max_nprobe"] == 1
    finally:
        server.stop()


def test_unknown_methods_share_one_metric_label(server: Server) -> None:
    for i in range(20):
        server.call(f"X{i}", "/search")
    text = server.call("GET", "/metrics")[1]
    assert 'endpoint="other"' in text and "X1" not in text and "X19" not in text


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "message"),
    [
        (
            "POST",
            "/items",
            {"items": [{"id": 7, "embedding": [0.1] * 16}, {"id": 8, "embedding": [0.1]}]},
            400,
            "every embedding must have the same length",
        ),
        ("POST", "/items", {"items": [{"id": 2**64, "embedding": [0.1] * 16}]}, 422, "invalid request"),
        ("DELETE", "/items", {"ids": [-(2**63) - 1]}, 422, "invalid request"),
        ("POST", "/search", {"queries": [{"id": 2**64}]}, 422, "invalid request"),
        ("POST", "/search", {"queries": [{"id": 1, "exclude": [2**70]}]}, 422, "invalid request"),
        ("POST", "/items", {"items": [{"id": "", "embedding": [0.1] * 16}]}, 422, "invalid request"),
    ],
)
def test_bad_items_and_ids_are_4xx(
    server: Server, method: str, path: str, body: Any, status: int, message: str
) -> None:
    got, answer = server.call(method, path, body, token=TOKEN)
    assert got == status and message in answer["error"]["message"], answer


def test_huge_query_values_are_refused_or_normalised(server: Server) -> None:
    status, body = server.call("POST", "/search", {"queries": [{"embedding": [3e38] * DIM}], "k": 3})
    expected = server.call("POST", "/search", {"queries": [{"embedding": [1.0] * DIM}], "k": 3})
    assert status == 200 and body == expected[1]  # a cosine index: same direction, same answer


def test_removing_every_item_of_a_4_bit_index_leaves_an_empty_working_index(
    server: Server, index_dir: Path
) -> None:
    every = Searcher.load(index_dir).tensors.ids.tolist()
    assert Searcher.load(index_dir).manifest.layer["codebook_size"] == 16
    for start in range(0, len(every), 1024):
        status, body = server.call("DELETE", "/items", {"ids": every[start : start + 1024]}, token=TOKEN)
        assert status == 200, body
    assert body["items"] == 0
    status, body = server.call("POST", "/search", {"queries": [{"id": 1}], "k": 5})
    assert status == 200 and body["results"] == [{"ids": [], "scores": []}]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--search-threads", "0"], "--search-threads: expected at least 1, got 0"),
        (["--max-k", "0"], "--max-k: expected at least 1, got 0"),
        (["--max-body-mb", "-1"], "--max-body-mb: expected a size in MiB above 0"),
        (["--workers", "0"], "--workers: expected at least 1, got 0"),
        (["--poll-s", "nan"], "--poll-s: expected seconds >= 0"),
        (["--port", "70000"], "--port: expected a TCP port from 1 to 65535, got 70000"),
        (["--port", "-1"], "--port: expected a TCP port from 1 to 65535, got -1"),
    ],
)
def test_serve_flags_are_validated(index_dir: Path, flags: list[str], message: str) -> None:
    assert message in serve_error(index_dir, flags)


def serve_error(index_dir: Path, flags: list[str], env: dict[str, str] | None = None) -> str:
    """The one ``error:`` line ``poeem serve INDEX_DIR FLAGS`` ends with (exit code 2, no traceback)."""
    clean = {k: v for k, v in os.environ.items() if k != "POEEM_TOKEN"}
    done = subprocess.run(
        [sys.executable, "-m", "poeem", "serve", str(index_dir), *flags],
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, **(env or {})},
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("file_bytes", "env_token", "message"),
    [
        (b"\xff\xfe" + b"x" * 30, None, "token file: expected a token of printable ASCII characters"),
        ("tökén-0123456789abcdef".encode(), None, "with a non-ASCII byte. Fix: write a new token into it"),
        (None, "tökén-0123456789abcdef", "token: expected printable ASCII characters without spaces"),
        (None, "two words 0123456789abcdef", "got a token with ' ' in it"),
        (b"short\n", None, "token: expected at least 16 characters, got 5 characters"),
    ],
)
def test_a_token_http_cannot_carry_is_refused_at_start(
    index_dir: Path, tmp_path: Path, file_bytes: bytes | None, env_token: str | None, message: str
) -> None:
    """Headers are read as Latin-1: a client sending a non-ASCII token as UTF-8 would never match."""
    flags = []
    if file_bytes is not None:
        (tmp_path / "token").write_bytes(file_bytes)
        flags = ["--token-file", str(tmp_path / "token")]
    line = serve_error(index_dir, flags, {"POEEM_TOKEN": env_token} if env_token else None)
    assert message in line and "secrets.token_urlsafe" in line, line


def test_a_server_config_refuses_a_non_ascii_token(index_dir: Path) -> None:
    from poeem.errors import PoeemError
    from poeem.serve.app import ServeConfig

    with pytest.raises(PoeemError, match="printable ASCII"):
        ServeConfig(str(index_dir), token="ünïcode-token-0123456789")


def test_a_token_with_a_trailing_newline_still_authorises(index_dir: Path) -> None:
    server = Server(index_dir, TOKEN + "\n")
    try:
        assert server.call("POST", "/reload", token=TOKEN)[0] == 200
    finally:
        server.stop()


def test_a_served_ivf_rq_index_answers_searches_after_a_delete(tmp_path: Path) -> None:
    layer, x = trained_layer("none", 8, quantizer="rq")
    Searcher.create(tmp_path / "ix", layer, x[:800], metric="ip")
    server = Server(tmp_path / "ix")
    try:
        status, body = server.call("DELETE", "/items", {"ids": [7, 8]}, token=TOKEN)
        assert status == 200 and body["items"] == 798, body
        query = {"queries": [{"embedding": x[7].tolist()}], "k": 800, "nprobe": 8}
        status, body = server.call("POST", "/search", query)
        assert status == 200, body
        assert len(body["results"][0]["ids"]) == 798 and not {7, 8} & set(body["results"][0]["ids"])
        assert server.call("GET", "/ready")[0] == 200
    finally:
        server.stop()


def random_json(rng: np.random.Generator, depth: int = 0) -> Any:
    """A JSON value of any type, biased to what breaks parsers: unicode digits, huge and tiny
    numbers, empty and ragged containers."""
    kind = rng.integers(0, 12 if depth < 2 else 8)
    choices: list[Any] = [
        int(rng.integers(-5, 20)),
        int(rng.choice([2**63 - 1, -(2**63), 2**64, 10**30, 0])),
        float(rng.choice([0.5, -1e308, 1e308, 3.4e38, 1e-45])),
        str(rng.choice(["3", "²", "١٢", "", "x", "𝟙", "-1", "1e3", " 4", "null", "a" * 300])),
        bool(rng.integers(0, 2)),
        None,
        str(rng.integers(0, 50)),
        "é" * int(rng.integers(1, 4)),
    ]
    if kind < 8:
        return choices[kind]
    if kind < 10:
        return [random_json(rng, depth + 1) for _ in range(int(rng.choice([0, 1, 3, 16])))]
    if kind == 10:
        return [[1.0] * int(rng.choice([1, 16])) for _ in range(int(rng.integers(1, 3)))]  # ragged
    return {str(random_json(rng, 2)): random_json(rng, depth + 1)}


def random_query(rng: np.random.Generator) -> Any:
    """A query: mostly a valid one with one field of random JSON, sometimes random throughout."""
    roll = rng.random()
    if roll < 0.1:
        return random_json(rng)
    if roll < 0.3:
        keys = ["id", "features", "embedding", "text", "exclude", "other"]
        return {
            str(k): random_json(rng) for k in rng.choice(keys, size=int(rng.integers(0, 4)), replace=False)
        }
    query: dict[str, Any] = {"id": int(rng.integers(0, 20))}
    if roll < 0.45:
        query = {"embedding": [float(v) for v in rng.normal(size=int(rng.choice([DIM, DIM, 3])))]}
    field = rng.choice(["exclude", "features", "none"])
    if field == "exclude":
        query["exclude"] = [random_json(rng, depth=2) for _ in range(int(rng.integers(0, 4)))]
    elif field == "features":
        query["features"] = random_json(rng, depth=1)
    return query


def test_no_generated_body_gets_a_5xx(server: Server) -> None:
    rng = np.random.default_rng(0)
    statuses = []
    for _ in range(150):
        body: Any = {"queries": [random_query(rng) for _ in range(int(rng.integers(1, 4)))]}
        for key in ("k", "nprobe"):
            if rng.random() < 0.4:
                body[key] = random_json(rng)
        if rng.random() < 0.1:
            body = random_json(rng)
        status, answer = server.call("POST", "/search", body)
        assert status < 500, (body, answer)
        statuses.append(status)
    for _ in range(60):
        items = [
            {"id": random_json(rng), "embedding": random_json(rng) if rng.random() < 0.5 else [0.1] * DIM}
            for _ in range(int(rng.integers(1, 3)))
        ]
        status, answer = server.call("POST", "/items", {"items": items}, token=TOKEN)
        assert status < 500, (items, answer)
        ids = [random_json(rng) for _ in range(int(rng.integers(1, 4)))]
        status, answer = server.call("DELETE", "/items", {"ids": ids}, token=TOKEN)
        assert status < 500, (ids, answer)
    assert 200 in statuses and 400 in statuses and 422 in statuses  # every path was reached
    bad = server.call("POST", "/search", {"queries": [{"id": 1, "exclude": ["²", "١٢", 3]}]})
    assert bad[0] == 200, bad
    ragged = server.call(
        "POST", "/search", {"queries": [{"id": 1, "features": [1.0]}, {"id": 2, "features": []}]}
    )
    assert ragged[0] == 400, ragged
    mixed = server.call("DELETE", "/items", {"ids": [1, "x"]}, token=TOKEN)
    assert mixed[0] == 400 and "'x'" in mixed[1]["error"]["message"], mixed
