"""``poeem serve``: the HTTP API over an index directory (FastAPI, run by uvicorn).

Endpoints: ``POST /search``, ``GET /health``, ``GET /ready``, ``GET /info``, ``GET /metrics``,
and, behind a bearer token, ``POST /items``, ``DELETE /items`` and ``POST /reload``. Every
error is JSON with a 4xx status; an unexpected failure is a 500 with a short JSON message (the
traceback goes to the server log, never to the client).
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import platform
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from typing import Annotated, Any

import faiss
import orjson
import torch
import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, ValidationError, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.supervisors import Multiprocess

from poeem._version import __version__
from poeem.errors import PoeemError
from poeem.export.index_dir import StaleIndexError
from poeem.ids import raw_id_array
from poeem.model.query_encoder import Query
from poeem.search.rerank import candidates, check_rerank
from poeem.serve.service import IndexService, set_search_threads

log = logging.getLogger("poeem.serve")
# a raw id: a 64-bit integer (FAISS ids) or a non-empty string ("" means "no result")
RawId = (
    Annotated[int, Field(strict=True, ge=-(2**63), le=2**63 - 1)]
    | Annotated[str, Field(strict=True, min_length=1)]
)
CONFIG_ENV = "POEEM_SERVE_CONFIG"
TOKEN_ENV = "POEEM_TOKEN"
MIN_TOKEN = 16  # characters of a bearer token at least
WORKER_START_S = 120  # seconds a server process may take to answer its first health check
NEW_TOKEN = "python -c 'import secrets; print(secrets.token_urlsafe(32))'"


@dataclass
class ServeConfig:
    """Settings of one server process."""

    index_dir: str
    backend: str = "faiss"
    max_k: int = 1000
    max_batch: int = 1024
    max_body_bytes: int = 8 << 20
    token: str | None = None  # bearer token of the write endpoints; None turns them off
    poll_s: float = 2.0  # how often to look for a newer version on disk (0: never)
    search_threads: int = 1  # FAISS/torch threads inside one search (requests run concurrently)
    max_exclude: int = 10_000  # ids one query may exclude (each one widens that query's search)
    max_nprobe: int = 256  # larger nprobe values are clamped to this
    max_rerank_candidates: int = 10_000  # ceil(rerank k): candidates one query may re-score

    def __post_init__(self) -> None:
        if self.token is not None:
            check_token(self.token)
        for name, low in (
            ("max_k", 1),
            ("max_batch", 1),
            ("max_body_bytes", 1024),
            ("search_threads", 1),
            ("max_exclude", 0),
            ("max_nprobe", 1),
            ("max_rerank_candidates", 1),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                flag = "--max-body-mb" if name == "max_body_bytes" else f"--{name.replace('_', '-')}"
                low_text = "1 KiB" if name == "max_body_bytes" else str(low)
                raise PoeemError(flag, f"at least {low_text}", repr(value), f"pass a larger {flag}")
        if not self.poll_s >= 0:  # NaN too
            raise PoeemError("--poll-s", "seconds >= 0 (0: never)", repr(self.poll_s), "pass --poll-s 2")


def check_token(token: str) -> None:
    """A clear error unless ``token`` can be a bearer token: at least 16 printable ASCII
    characters without spaces. HTTP headers carry bytes that servers read as Latin-1, so a
    client sending UTF-8 could never match a non-ASCII token."""
    if len(token) < MIN_TOKEN:
        raise PoeemError(
            "token",
            f"at least {MIN_TOKEN} characters",
            f"{len(token)} characters",
            f"use a long random token ({NEW_TOKEN})",
        )
    odd = next((c for c in token if not "!" <= c <= "~"), None)
    if odd is not None:
        raise PoeemError(
            "token",
            "printable ASCII characters without spaces (HTTP headers carry no other text reliably)",
            f"a token with {odd!r} in it",
            f"make a new token, e.g. {NEW_TOKEN}",
        )


class QueryIn(BaseModel):
    """A query: ``id`` (with optional ``features``), ``embedding`` or ``text`` (indexes of text
    models), and ids to ``exclude``."""

    model_config = ConfigDict(extra="forbid")
    id: RawId | None = None
    features: list[float] | None = None
    embedding: list[float] | None = None
    text: str | None = Field(default=None, min_length=1)
    exclude: list[RawId] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_kind(self) -> QueryIn:
        if sum(v is not None for v in (self.id, self.embedding, self.text)) != 1:
            raise ValueError("give exactly one of 'id', 'embedding' and 'text'")
        if self.features is not None and self.id is None:
            raise ValueError("'features' go with a query 'id'")
        return self


class SearchIn(BaseModel):
    """``POST /search``."""

    model_config = ConfigDict(extra="forbid")
    queries: list[QueryIn] = Field(min_length=1)
    k: StrictInt = 10
    nprobe: StrictInt = 1
    rerank: StrictInt | StrictFloat | None = None  # None: the index's default


class ItemIn(BaseModel):
    """An item to add: its own id, and its ``embedding`` (the item tower's output) or, for an
    index of a text model, its ``text``."""

    model_config = ConfigDict(extra="forbid")
    id: RawId
    embedding: list[float] | None = None
    text: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one_kind(self) -> ItemIn:
        if (self.embedding is None) == (self.text is None):
            raise ValueError("give exactly one of 'embedding' and 'text'")
        return self


class AddIn(BaseModel):
    """``POST /items``."""

    model_config = ConfigDict(extra="forbid")
    items: list[ItemIn] = Field(min_length=1)


class RemoveIn(BaseModel):
    """``DELETE /items``."""

    model_config = ConfigDict(extra="forbid")
    ids: list[RawId] = Field(min_length=1)


class HttpError(Exception):
    """An error answered with ``status`` and a JSON body."""

    def __init__(self, status: int, message: str, **detail: Any) -> None:
        super().__init__(message)
        self.status, self.message, self.detail = status, message, detail


def error_body(message: str, **detail: Any) -> dict[str, Any]:
    """The JSON body of every error response."""
    return {"error": {"message": message, **detail}}


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` gets 413, whether its length is declared
    or it is streamed. The body is read here (at most ``max_bytes`` held) and replayed to the app."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        if scope["method"] in ("POST", "DELETE", "PUT") and b"json" not in headers.get(b"content-type", b""):
            # every body here is JSON: accept it without the header (or with curl -d's form type)
            kept = [(k, v) for k, v in scope.get("headers") or [] if k != b"content-type"]
            scope = {**scope, "headers": [*kept, (b"content-type", b"application/json")]}
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(scope, receive, send)
            return
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self._reject(scope, receive, send)
                return
            if message["type"] != "http.request" or not message.get("more_body"):
                break
        pending = iter(messages)

        async def replay() -> dict:
            return next(pending, None) or await receive()

        await self.app(scope, replay, send)

    async def _reject(self, scope: dict, receive: Callable, send: Callable) -> None:
        body = error_body(f"request body over {self.max_bytes} bytes", fix="send smaller batches")
        await JSONResponse(body, status_code=413)(scope, receive, send)


class ServerMetrics:
    """The Prometheus metrics of one application."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "poeem_requests", "HTTP requests", ["endpoint", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "poeem_request_seconds",
            "Request latency",
            ["endpoint"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.items = Gauge("poeem_index_items", "Items in the served index", registry=self.registry)
        self.version = Gauge("poeem_index_version", "Served index version", registry=self.registry)


class Server:
    """What the routes share: the config, the served index once loaded, and the metrics."""

    def __init__(self, config: ServeConfig) -> None:
        self.config, self.metrics = config, ServerMetrics()
        self.loaded: IndexService | None = None

    def service(self) -> IndexService:
        """The served index (503 until it is loaded)."""
        if self.loaded is None:
            raise HttpError(503, "the index is not loaded yet")
        return self.loaded

    def poll(self, stop: threading.Event) -> None:
        """Reload the index whenever its directory names a new version, until ``stop``."""
        while not stop.wait(self.config.poll_s):
            try:
                self.service().reload_if_changed()
            except Exception:  # keep polling; the current index keeps serving
                log.exception("polling the index directory failed")

    def require_token(self, request: Request) -> None:
        """Refuse a write without the server's bearer token."""
        if self.config.token is None:
            raise HttpError(
                403,
                "write endpoints are off: the server has no token",
                fix=f"start 'poeem serve' with {TOKEN_ENV} set or --token-file",
            )
        given = request.headers.get("authorization", "")
        expected = f"Bearer {self.config.token}"
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise HttpError(401, "missing or wrong bearer token", fix="send 'Authorization: Bearer <token>'")

    def check_limits(self, k: int, nprobe: int, batch: int, rerank: float | None = None) -> None:
        """Refuse a request past the server's limits."""
        if not 1 <= k <= self.config.max_k:
            raise HttpError(400, f"k must be between 1 and {self.config.max_k}", received=k)
        if rerank is not None:
            factor = check_rerank(rerank)  # a number in [0, MAX_RERANK_FACTOR], else 400
            wanted = candidates(factor, k, ntotal=1 << 62)  # before the index's size clamps it
            if wanted > self.config.max_rerank_candidates:
                raise HttpError(
                    400,
                    f"rerank times k at most {self.config.max_rerank_candidates} candidates per query",
                    received=wanted,
                    fix="ask for a smaller rerank factor or k",
                )
        if nprobe < 1:
            raise HttpError(400, "nprobe must be at least 1", received=nprobe)
        if batch > self.config.max_batch:
            raise HttpError(
                400, f"at most {self.config.max_batch} per request", received=batch, fix="split the batch"
            )


def server_of(request: Request) -> Server:
    """The :class:`Server` of the application answering ``request``."""
    return request.app.state.server


def create_app(config: ServeConfig) -> FastAPI:
    """The FastAPI application serving ``config.index_dir``."""
    server = Server(config)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        set_search_threads(config.search_threads)
        server.loaded = IndexService(config.index_dir, config.backend)  # type: ignore[arg-type]
        stop = threading.Event()
        if config.poll_s > 0:
            threading.Thread(target=server.poll, args=(stop,), daemon=True, name="poeem-poll").start()
        yield
        stop.set()

    app = FastAPI(
        title="poeem",
        version=__version__,
        summary="Search a jointly trained product-quantization index (Poeem) exported to FAISS.",
        lifespan=lifespan,
    )
    app.state.server = server
    for error, handler in ERROR_HANDLERS:
        app.add_exception_handler(error, handler)  # type: ignore[arg-type]
    app.middleware("http")(_measure)
    app.include_router(router)
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    return app


async def _http_error(_: Request, err: HttpError) -> JSONResponse:
    return JSONResponse(error_body(err.message, **err.detail), status_code=err.status)


async def _poeem_error(_: Request, err: PoeemError) -> JSONResponse:
    status = 409 if isinstance(err, StaleIndexError) else 400
    detail = {"what": err.what, "expected": err.expected, "received": err.received, "fix": err.fix}
    return JSONResponse(error_body(str(err), **detail), status_code=status)


async def _routing_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(error_body(str(err.detail)), status_code=err.status_code, headers=err.headers)


async def _invalid(_: Request, err: RequestValidationError) -> JSONResponse:
    problems = [
        {"where": ".".join(str(p) for p in e.get("loc", ())), "problem": e.get("msg", "")}
        for e in err.errors()
    ]
    return JSONResponse(error_body("invalid request", problems=problems), status_code=422)


async def _unexpected(_: Request, err: Exception) -> JSONResponse:
    log.exception("unexpected error")
    return JSONResponse(error_body(f"internal error ({type(err).__name__})"), status_code=500)


ERROR_HANDLERS: list[tuple[type[Exception], Callable[..., Awaitable[JSONResponse]]]] = [
    (HttpError, _http_error),
    (PoeemError, _poeem_error),
    (StarletteHTTPException, _routing_error),
    (RequestValidationError, _invalid),
    (Exception, _unexpected),
]


async def _measure(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    """Count each request and time it, by endpoint."""
    started = time.perf_counter()
    response = await call_next(request)
    route = request.scope.get("route")
    known = route is not None and request.method in (getattr(route, "methods", None) or ())
    endpoint = f"{request.method} {route.path}" if known else "other"  # bounded label set
    metrics = server_of(request).metrics
    metrics.requests.labels(endpoint, str(response.status_code)).inc()
    metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
    return response


router = APIRouter()
SEARCH_SCHEMA = {"content": {"application/json": {"schema": SearchIn.model_json_schema()}}, "required": True}


@router.post("/search", openapi_extra={"requestBody": SEARCH_SCHEMA})
async def search(request: Request) -> Response:
    """Top-k items of each query, best first, in the items' own ids:
    ``{"version": v, "results": [{"ids": [...], "scores": [...]}, ...]}``. ``nprobe`` above
    the server's ``max_nprobe`` is clamped to it; a query may exclude ``max_exclude`` ids;
    ``rerank`` (F, an index with stored vectors) re-scores the top F k candidates, at most
    ``max_rerank_candidates``.

    The hot path: the body is parsed and validated in one pass (pydantic's JSON parser), the
    search runs in the thread pool, and orjson writes the answer."""
    server = server_of(request)
    try:
        body = SearchIn.model_validate_json(await request.body())
    except ValidationError as err:
        raise RequestValidationError(err.errors()) from None
    server.check_limits(body.k, body.nprobe, len(body.queries), body.rerank)
    longest = max(len(q.exclude) for q in body.queries)
    if longest > server.config.max_exclude:
        raise HttpError(
            400,
            f"at most {server.config.max_exclude} excluded ids per query",
            received=longest,
            fix="filter long exclusion lists on the client, or ask for a larger k",
        )
    queries = [Query(q.id, q.features, q.embedding, q.text, q.exclude) for q in body.queries]
    nprobe = min(body.nprobe, server.config.max_nprobe)
    hits, version = await run_in_threadpool(server.service().search, queries, body.k, nprobe, body.rerank)
    payload = {"version": version, "results": [{"ids": h.ids, "scores": h.scores} for h in hits]}
    return Response(orjson.dumps(payload), media_type="application/json")


@router.get("/health")
def health() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/ready")
def ready(request: Request) -> dict[str, Any]:
    """Readiness: an index is loaded (503 otherwise)."""
    return {"status": "ready", "version": server_of(request).service().searcher.version}


@router.get("/info")
def info(request: Request) -> dict[str, Any]:
    """The served index: config, size, version, and library versions."""
    server = server_of(request)
    config, s = server.config, server.service().searcher
    m = s.manifest
    return {
        "index_dir": str(s.directory),
        "version": m.version,
        "items": s.ntotal,
        "lists": s.nlist,
        "metric": m.metric,
        "dim": m.dim,
        "layer": m.layer,
        "fast_scan": m.fast_scan,
        "backend": s.backend,
        "query_tower": m.query_tower is not None,
        "text_queries": m.text_query is not None,
        "text_items": m.text_item is not None,
        "rerank": None if s.vector_codec is None else s.vector_codec.precision,
        "writes_enabled": config.token is not None,
        "limits": {
            "max_k": config.max_k,
            "max_batch": config.max_batch,
            "max_body_bytes": config.max_body_bytes,
            "max_exclude": config.max_exclude,
            "max_nprobe": config.max_nprobe,
            "max_rerank_candidates": config.max_rerank_candidates,
        },
        "versions": {
            "poeem": __version__,
            "faiss": faiss.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "index_written_by_poeem": m.poeem_version,
        },
    }


@router.get("/metrics")
def metrics(request: Request) -> Response:
    """Prometheus text format."""
    server = server_of(request)
    if server.loaded is not None:
        server.metrics.items.set(server.loaded.searcher.ntotal)
        server.metrics.version.set(server.loaded.searcher.version)
    return PlainTextResponse(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.post("/items")
def add_items(body: AddIn, request: Request) -> dict[str, Any]:
    """Add items by embedding or by text (coded with the frozen codebooks); publishes a new
    version."""
    server = server_of(request)
    server.require_token(request)
    server.check_limits(1, 1, len(body.items))
    lengths = {len(item.embedding) for item in body.items if item.embedding is not None}
    if len(lengths) > 1:
        raise HttpError(400, "every embedding must have the same length", received=sorted(lengths)[:5])
    ids = raw_id_array([item.id for item in body.items])
    published = server.service().add(
        [item.embedding for item in body.items], [item.text for item in body.items], ids
    )
    return {"added": len(body.items), "version": published.version, "items": published.ntotal}


@router.delete("/items")
def remove_items(body: RemoveIn, request: Request) -> dict[str, Any]:
    """Remove items by their own ids; publishes a new version."""
    server = server_of(request)
    server.require_token(request)
    server.check_limits(1, 1, len(body.ids))
    removed, published = server.service().remove(raw_id_array(body.ids))
    return {"removed": removed, "version": published.version, "items": published.ntotal}


@router.post("/reload")
def reload(request: Request) -> dict[str, Any]:
    """Load the newest version on disk and swap it in; a broken one is refused (the old one stays)."""
    server = server_of(request)
    server.require_token(request)  # a reload re-reads and checks the whole index: a write
    previous, current = server.service().reload()
    return {"previous_version": previous, "version": current}


def app_from_env() -> FastAPI:
    """The app for uvicorn's ``--factory`` (several workers): the config comes from the environment."""
    raw = os.environ.get(CONFIG_ENV)
    if raw is None:
        raise PoeemError(
            "serve config", f"the {CONFIG_ENV} environment variable", "none", "start with 'poeem serve'"
        )
    return create_app(ServeConfig(**json.loads(raw)))


class NoDelayConfig(uvicorn.Config):
    """uvicorn's config, with TCP_NODELAY on the listening socket.

    With several workers uvicorn binds the socket itself, and asyncio then leaves Nagle's
    algorithm on for its connections (it only sets TCP_NODELAY on sockets created for TCP by
    protocol number): every response waited for a 40 ms delayed ACK. Accepted connections
    inherit TCP_NODELAY from the listening socket on Linux. (Module level, so that the worker
    processes can unpickle it.)
    """

    def bind_socket(self) -> socket.socket:
        sock = super().bind_socket()
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock


def check_port_free(host: str, port: int) -> None:
    """A clear error, before any worker starts, when ``host:port`` cannot be listened on."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise PoeemError(
            "--host", "an address of this machine", f"'{host}' ({err})", "pass e.g. 127.0.0.1"
        ) from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as err:
            raise PoeemError(
                "--port",
                f"a port free on {host}",
                f"{port} ({err.strerror})",
                "pass another --port, or stop the server already listening there",
            ) from None


def run_server(
    config: ServeConfig,
    host: str,
    port: int,
    workers: int = 1,
    log_level: str = "info",
    banner: str | None = None,
) -> None:
    """Run the service under uvicorn: one process, or ``workers`` processes sharing one socket.

    A busy port is a clear error before anything starts; ``banner`` is printed once it is free."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise PoeemError("--port", "a TCP port from 1 to 65535", repr(port), "pass e.g. --port 8000")
    check_port_free(host, port)
    if banner:
        print(banner, flush=True)
    os.environ[CONFIG_ENV] = json.dumps(asdict(config))  # what each worker's app_from_env reads
    uv_config = NoDelayConfig(
        "poeem.serve.app:app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=log_level,
        # uvicorn restarts a worker that does not answer its health check in time; one still
        # importing torch and FAISS on a busy machine can take longer than uvicorn's 5 s
        timeout_worker_healthcheck=WORKER_START_S,
    )
    if workers > 1:
        Multiprocess(uv_config, sockets=[uv_config.bind_socket()]).run()
    else:
        uv_config.load_app()
        uvicorn.Server(uv_config).run()
