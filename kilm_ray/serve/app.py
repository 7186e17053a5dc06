"""The Ray Serve application: a thin FastAPI ingress and one model deployment.

    HTTP --> gate (auth, draining, admission, streamed body limit) --> ProbeAPI (FastAPI, CPU: validates,
         translates the protocols, streams) --handle--> KilmModel (tokenizes, batches, generates, decodes)

Routes: the probe API (``/v1/describe``, ``/v1/disambiguate``, ``/v1/appositive``, ``/v1/qa``, ``/v1/fill``,
streaming with ``"stream": true``), Hugging Face TGI (``POST /generate``, ``/generate_stream``, ``/``),
OpenAI completions (``POST /v1/completions``, ``GET /v1/models``), a page to try probes (``GET /``), and
``/docs`` + ``/openapi.json``. Every route passes the gate and is counted in the metrics; errors are
JSON in the route's protocol (``protocols.error_body``).

The export is the model deployment's ``user_config`` (``{"model": uri}``): a new export is rolled out by
``reconfigure`` while the old one keeps answering; each request runs on the export that tokenized it
(``replica.py``). The ingress's ``user_config`` is ``{"draining": bool}``: a graceful stop sets it, and
from then on new requests get 503 while those in flight finish.

Metrics (``ray.serve.metrics``, on Ray's Prometheus endpoint, tagged with deployment and replica):
``kilm_http_requests`` (endpoint, status), ``kilm_http_request_latency_ms`` (endpoint; streams: to their
last byte), ``kilm_http_in_flight``, ``kilm_model_batch_size`` (method), ``kilm_model_waiting_requests``,
``kilm_generated_tokens`` (endpoint). Each request is logged once by the ingress on the ``ray.serve``
logger (structured, with Serve's request id).
"""

# No "from __future__ import annotations": FastAPI must see real types on the ingress methods.

import asyncio
import functools
import hashlib
import hmac
import importlib
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Optional, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from kilm_ray.serve import protocols as proto
from kilm_ray.serve.protocols import (
    BusyErrorBody, CompletionRequest, ErrorBody, OpenAIErrorBody, TgiErrorBody, TgiRequest, ValidationErrorBody,
)
from kilm_ray.serve.replica import KilmModel
from kilm_ray.serve.schemas import (
    AppositiveRequest, AppositiveResponse, DescribeRequest, DescribeResponse, DisambiguateRequest,
    DisambiguateResponse, FillRequest, FillResponse, QARequest, QAResponse,
)

log = logging.getLogger("kilm_ray.serve")
request_log = logging.getLogger("ray.serve")  # Serve formats it (JSON with logging_config) and adds the request id
API_VERSION = "v1"
OPEN_ROUTES = {("GET", "/"), ("GET", "/healthz")}  # no bearer token: the page (static) and health checks
RETRY_AFTER_S = 1
PAGE = Path(__file__).with_name("static") / "index.html"
GENERATING_PROBES = ("/v1/describe", "/v1/appositive", "/v1/qa", "/v1/fill")


class ApiError(Exception):
    """An answer other than 2xx; written as JSON in the route's protocol by the gate."""

    def __init__(self, status: int, message: str, problems: Optional[list[str]] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.problems, self.code = status, message, problems, code


def protocol_of(method: str, path: str) -> str:
    if path in ("/generate", "/generate_stream") or (path == "/" and method == "POST"):
        return "tgi"
    if path in ("/v1/completions", "/v1/models"):
        return "openai"
    return "kilm"


def error_response(protocol: str, status: int, message: str, problems: Optional[list[str]] = None,
                   code: Optional[str] = None) -> JSONResponse:
    if protocol == "openai" and status == 422:
        status = 400  # OpenAI answers a request it cannot take with 400 invalid_request_error
    headers = {}
    if status == 503:
        headers["Retry-After"] = str(RETRY_AFTER_S)
        message = message if message.endswith("retry later") else f"{message}; retry later"
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    body = proto.error_body(protocol, status, message, problems, RETRY_AFTER_S if status == 503 else None, code)
    return JSONResponse(status_code=status, content=body, headers=headers)


def validation_error(exc: RequestValidationError) -> ApiError:
    problems = []
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            return ApiError(400, f"request body is not valid JSON: {err.get('msg')}")
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        problems.append(f"{where}: {err.get('msg')}")
    return ApiError(422, "; ".join(problems), problems)


def ray_failure(exc: BaseException) -> ApiError:
    """A failed call to the model deployment, as the answer the client gets (JSON, never a plain 500)."""
    from ray.exceptions import OutOfMemoryError, RayActorError, RayTaskError, TaskCancelledError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError

    if isinstance(exc, BackPressureError):
        return ApiError(503, "the model is at capacity (queue full)")
    if isinstance(exc, OutOfMemoryError):
        return ApiError(503, "the model replica ran out of memory and is being restarted")
    if isinstance(exc, (RayActorError, DeploymentUnavailableError)):
        return ApiError(503, "the model replica stopped (it is being restarted)")
    if isinstance(exc, (RequestCancelledError, TaskCancelledError, asyncio.CancelledError)):
        return ApiError(503, "the request was cancelled")
    if isinstance(exc, RayTaskError):
        cause = exc.cause if getattr(exc, "cause", None) is not None else exc
        return ApiError(500, f"the model failed on this request: {type(cause).__name__}: {str(cause)[:300]}")
    return ApiError(500, f"internal error: {type(exc).__name__}: {str(exc)[:300]}")


# ----------------------------------------------------------------------------------------------
# The gate: what every request passes before its body is read
# ----------------------------------------------------------------------------------------------


@dataclass
class Gate:
    """The bearer token, draining (a graceful stop in progress), admission (so the ingress answers 503 in
    our format before Serve's own queue would), and the body limit counted on the bytes actually received
    (a chunked body has no Content-Length)."""

    max_request_bytes: int = 65536
    token: Optional[str] = None
    max_in_flight: int = 0  # 0: no limit
    in_flight: int = 0
    draining: bool = False
    metrics: dict = field(default_factory=dict)

    def unauthorized(self, method: str, path: str, authorization: Optional[str]) -> bool:
        if self.token is None or (method, path) in OPEN_ROUTES:
            return False
        expected = f"Bearer {self.token}".encode()
        return not authorization or not hmac.compare_digest(authorization.encode(), expected)


_GATE = Gate()


def _gate() -> Gate:
    # Serve may ship this module's classes by value: always reach the importable module's gate.
    return importlib.import_module("kilm_ray.serve.app")._GATE


class _TooLarge(Exception):
    pass


async def _read_limited(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise _TooLarge(f"request body is {length} bytes; the limit is {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:  # stop reading: the rest is never buffered
            raise _TooLarge(f"request body is over {limit} bytes (the limit)")
    return bytes(body)


def _as_json_request(request: Request, body: bytes) -> Request:
    """The same request with its (already read) body replayed, declared as JSON: the API takes JSON only,
    so ``curl -d`` (form content type) works as written instead of failing validation."""
    scope = dict(request.scope)
    scope["headers"] = [(k, v) for k, v in scope["headers"] if k != b"content-type"] + \
        [(b"content-type", b"application/json")]
    replayed = False

    async def receive():
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await request.receive()

    return Request(scope, receive)


class _GatedRoute(APIRoute):
    """Auth, draining, admission and the streamed body limit run here, before FastAPI reads and validates
    the body; every error becomes JSON in the route's protocol; a streamed answer stays counted in flight
    until its last byte. (A route class rather than a middleware: Serve's class-based ingress keeps the
    routes it is given.)"""

    def get_route_handler(self):
        handler = super().get_route_handler()
        path = self.path

        async def gated(request: Request):
            gate = _gate()
            started = time.perf_counter()
            protocol = protocol_of(request.method, path)
            if gate.unauthorized(request.method, path, request.headers.get("authorization")):
                response = error_response(protocol, 401, "missing or wrong bearer token (Authorization: Bearer <token>)")
            elif gate.draining:
                response = error_response(protocol, 503, "the service is stopping")
            elif gate.max_in_flight and gate.in_flight >= gate.max_in_flight:
                response = error_response(protocol, 503, f"the service is at capacity ({gate.in_flight} requests in flight)")
            else:
                gate.in_flight += 1
                _observe(gate, "in_flight", gate.in_flight)
                response = None
                try:
                    response = await _answer(handler, request, protocol, gate)
                finally:
                    if isinstance(response, CountedStream):
                        response.on_end = lambda status: _end_stream(gate, request.method, path, started, status)
                    else:
                        _release(gate)
                if isinstance(response, CountedStream):
                    return response
            _record(gate, request.method, path, response.status_code, time.perf_counter() - started)
            return response

        return gated


async def _answer(handler, request: Request, protocol: str, gate: Gate):
    try:
        if request.method in ("POST", "PUT", "PATCH"):
            request = _as_json_request(request, await _read_limited(request, gate.max_request_bytes))
        return await handler(request)
    except _TooLarge as exc:
        return error_response(protocol, 413, str(exc))
    except ApiError as exc:
        return error_response(protocol, exc.status, exc.message, exc.problems, exc.code)
    except RequestValidationError as exc:
        e = validation_error(exc)
        return error_response(protocol, e.status, e.message, e.problems)
    except StarletteHTTPException as exc:  # FastAPI's own, e.g. "There was an error parsing the body"
        detail = exc.detail
        if exc.status_code == 400 and detail == "There was an error parsing the body":
            detail = "request body is not valid JSON (or not UTF-8 text)"
        return error_response(protocol, exc.status_code, str(detail))
    except Exception as exc:  # noqa: BLE001 - a bug or a failed call: still JSON, and logged
        log.exception("%s %s failed", request.method, request.url.path)
        e = ray_failure(exc)
        return error_response(protocol, e.status, e.message)


def _release(gate: Gate) -> None:
    gate.in_flight -= 1
    _observe(gate, "in_flight", gate.in_flight)


class CountedStream(StreamingResponse):
    """A streamed answer that calls ``on_end(status)`` once its ASGI call ends: 200 when every byte was sent,
    499 when the client left or the call was cancelled (also before the body began), 500 when the body
    failed. An answer that did not finish cancels its model streams (``streams``), so the replica stops
    generating for nobody. (Counting in a wrapper of the body iterator leaked the in-flight slot when
    Starlette never started the body: a generator that never ran runs no ``finally``; enough leaks and every
    request is a 503 "at capacity".)"""

    on_end: Optional[Callable[[int], None]] = None
    streams: Sequence[Any] = ()

    async def __call__(self, scope, receive, send) -> None:
        status = 500
        try:
            await super().__call__(scope, receive, send)
            status = 200
        except (ClientDisconnect, asyncio.CancelledError, OSError):
            status = 499
            raise
        finally:
            if status != 200:
                for stream in self.streams:
                    stream.cancel()
            end, self.on_end = self.on_end, None
            if end is not None:
                end(status)


def _end_stream(gate: Gate, method: str, path: str, started: float, status: int) -> None:
    _release(gate)
    _record(gate, method, path, status, time.perf_counter() - started)


def _observe(gate: Gate, name: str, value: float) -> None:
    if name in gate.metrics:
        gate.metrics[name].set(value)


def _record(gate: Gate, method: str, path: str, status: int, seconds: float) -> None:
    latency_ms = round(1000 * seconds, 2)
    if gate.metrics:
        gate.metrics["requests"].inc(tags={"endpoint": path, "status": str(status)})
        gate.metrics["latency"].observe(latency_ms, tags={"endpoint": path})
    if (method, path) not in OPEN_ROUTES:
        request_log.info("%s %s %d %.1fms", method, path, status, latency_ms,
                         extra={"endpoint": path, "status_code": status, "latency_ms": latency_ms})


# ----------------------------------------------------------------------------------------------
# The FastAPI application and its published schema
# ----------------------------------------------------------------------------------------------

app = FastAPI(title="kilm_ray knowledge probes", version=API_VERSION, docs_url=None, redoc_url=None,
              openapi_url=None, description="Probe the entity knowledge injected into BART by KILM; or call the "
                                            "model through TGI's or OpenAI's text-generation protocol.")
app.router.route_class = _GatedRoute


def _errors(model, codes, validation=None) -> dict:
    out = {code: {"model": model, "description": "error"} for code in codes}
    if validation is not None:
        out[422] = {"model": validation, "description": "the request does not fit the endpoint"}
    return out


KILM_ERRORS = {**_errors(ErrorBody, (400, 401, 413, 500), ValidationErrorBody),
               503: {"model": BusyErrorBody, "description": "full, stopping, or a replica restarting: retry later"}}
TGI_ERRORS = _errors(TgiErrorBody, (400, 401, 413, 500, 503), TgiErrorBody)
OPENAI_ERRORS = _errors(OpenAIErrorBody, (400, 401, 404, 413, 500, 503))
SSE_CONTENT = {"text/event-stream": {"schema": {"type": "string"}}}


def openapi_schema() -> dict:
    """FastAPI's schema with each route's real error bodies (no default ``{"detail"}`` 422 anywhere)."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            if protocol_of(method.upper(), path) == "openai":
                operation["responses"].pop("422", None)  # OpenAI's clients get 400 for an invalid request
    components = schema.get("components", {}).get("schemas", {})
    import json

    for name in ("HTTPValidationError", "ValidationError"):
        if f"#/components/schemas/{name}" not in json.dumps(schema["paths"]) and name in components:
            del components[name]
    app.openapi_schema = schema
    return schema


@app.exception_handler(StarletteHTTPException)  # 404 / 405 from routing (no route, so no gate)
async def _http_error(request: Request, exc: StarletteHTTPException):
    path = request.url.path[len(request.scope.get("root_path", "")):] or "/"
    return error_response(protocol_of(request.method, path), exc.status_code, str(exc.detail))


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    e = validation_error(exc)
    return error_response("kilm", e.status, e.message, e.problems)


def _sse(frames: AsyncIterator[bytes], streams: Sequence[Any]) -> CountedStream:
    """A server-sent-events answer over the given model streams (cancelled if the answer does not finish)."""
    response = CountedStream(frames, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    response.streams = list(streams)
    return response


def _done(out: dict) -> dict:
    if "done" not in out:
        raise ApiError(int(out.get("status", 500)), str(out.get("error", "no answer")))
    return out["done"]


def admission_limit(settings: dict) -> int:
    """Requests one ingress replica holds at once before answering 503: what the model replicas can run
    and queue (0 = unlimited when the model queue is)."""
    queued = int(settings["max_queued_requests"])
    if queued < 0:
        return 0
    replicas = int(settings["max_replicas"] if settings["autoscaling"] else settings["num_replicas"])
    return max(1, (int(settings["max_ongoing_requests"]) + queued) * replicas // max(1, int(settings["ingress_replicas"])))


@serve.deployment(name="ProbeAPI")
@serve.ingress(app)
class ProbeAPI:
    def __init__(self, model, settings: dict):
        from ray.serve.metrics import Counter, Gauge, Histogram

        self.model = model
        self.settings = settings
        self.model_id = str(settings["app_name"])
        self.created = int(time.time())
        gate = _gate()
        gate.max_request_bytes = int(settings["max_request_bytes"])
        gate.token = settings.get("auth_token") or os.environ.get("KILM_SERVE_TOKEN") or None
        gate.max_in_flight = admission_limit(settings)
        gate.metrics = {
            "requests": Counter("kilm_http_requests", description="HTTP requests answered",
                                tag_keys=("endpoint", "status")),
            "latency": Histogram("kilm_http_request_latency_ms", description="HTTP request latency (ms)",
                                 boundaries=[5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000],
                                 tag_keys=("endpoint",)),
            "in_flight": Gauge("kilm_http_in_flight", description="requests in this ingress replica"),
        }

    async def reconfigure(self, config: dict) -> None:
        _gate().draining = bool(config.get("draining", False))

    async def in_flight(self) -> int:
        """Requests this ingress replica is answering (a graceful stop waits for 0)."""
        return _gate().in_flight

    # -- calling the model ------------------------------------------------------------------------

    def _limit(self, value: Optional[int], field: str, default: int, setting: str) -> int:
        value = value or default
        if value > int(self.settings[setting]):
            raise ApiError(422, f"{field}: {value} is above the server limit {self.settings[setting]}")
        return value

    def _options(self, req) -> tuple[int, int]:
        max_new = self._limit(req.max_new_tokens, "max_new_tokens", int(self.settings["default_max_new_tokens"]),
                              "max_new_tokens_limit")
        beams = self._limit(req.num_beams, "num_beams", 1, "max_beams")
        return max_new, beams

    async def _call(self, method: str, job: dict) -> dict:
        try:
            out = await getattr(self.model, method).remote(job)
        except Exception as exc:  # noqa: BLE001 - mapped to a JSON answer
            raise ray_failure(exc) from None
        if out.get("type") == "error":
            raise ApiError(int(out["status"]), out["error"])
        return out

    async def _open(self, job: dict):
        """Start a streamed answer; its first event is checked first, so a bad request is still a 4xx."""
        try:
            stream = self.model.options(stream=True).stream.remote(job)
            first = await stream.__anext__()
        except Exception as exc:  # noqa: BLE001
            raise ray_failure(exc) from None
        if first["type"] == "error":
            raise ApiError(int(first["status"]), first["error"])
        return first, stream

    @staticmethod
    async def _events(stream) -> AsyncIterator[dict]:
        """The rest of a streamed answer; a failure midway becomes a last ``error`` event."""
        try:
            async for event in stream:
                yield event
        except Exception as exc:  # noqa: BLE001
            e = ray_failure(exc)
            yield {"type": "error", "status": e.status, "error": e.message}

    async def _probe(self, endpoint: str, task: str, req, fields: dict):
        max_new, beams = self._options(req)
        job = {"task": task, "fields": fields, "max_new_tokens": max_new, "num_beams": beams, "endpoint": endpoint}
        if not req.stream:
            return proto.probe_response(_done(await self._call("answer", job)))
        _, stream = await self._open(job)

        async def frames():
            async for event in self._events(stream):
                for frame in proto.probe_frames(event):
                    yield frame

        return _sse(frames(), [stream])

    # -- the page, health, schema -----------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    async def page(self):
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi_json(self):
        return JSONResponse(openapi_schema())

    @app.get("/docs", include_in_schema=False)
    async def docs(self, request: Request):
        return get_swagger_ui_html(openapi_url=request.scope.get("root_path", "") + "/openapi.json",
                                   title=f"{app.title} - docs")

    @app.get(f"/{API_VERSION}/model", responses=_errors(ErrorBody, (401, 500)))
    async def model_info(self) -> dict:
        from kilm_ray.tokenizer import KILM_TOKENS

        try:
            info = await self.model.info.remote()
        except Exception as exc:  # noqa: BLE001
            raise ray_failure(exc) from None
        s = self.settings
        return {**info, "api_version": API_VERSION, "special_tokens": KILM_TOKENS, "id": self.model_id,
                "checkpoint": info["meta"].get("checkpoint"), "step": info["meta"].get("step"),
                "generation_defaults": {"max_new_tokens": s["default_max_new_tokens"], "num_beams": 1,
                                        "no_repeat_ngram_size": s.get("no_repeat_ngram_size", 0)},
                "limits": {k: s[k] for k in ("max_new_tokens_limit", "max_beams", "max_input_tokens",
                                             "max_candidates", "max_candidate_tokens", "max_request_bytes",
                                             "max_batch_size")}}

    # -- the probe API ----------------------------------------------------------------------------

    @app.post(f"/{API_VERSION}/describe", response_model=DescribeResponse,
              responses={**KILM_ERRORS, 200: {"content": SSE_CONTENT}})
    async def describe(self, req: DescribeRequest):
        return await self._probe("/v1/describe", "describe", req,
                                 {"text": req.text, "left": req.left, "mention": req.mention, "right": req.right})

    @app.post(f"/{API_VERSION}/disambiguate", response_model=DisambiguateResponse, responses=KILM_ERRORS)
    async def disambiguate(self, req: DisambiguateRequest):
        limit = int(self.settings["max_candidates"])
        if len(req.candidates) > limit:
            raise ApiError(422, f"candidates: {len(req.candidates)} given; the limit is {limit}")
        return await self._call("disambiguate", {"fields": {
            "text": req.text, "left": req.left, "mention": req.mention, "right": req.right,
            "candidates": [c.model_dump() for c in req.candidates]}})

    @app.post(f"/{API_VERSION}/appositive", response_model=AppositiveResponse,
              responses={**KILM_ERRORS, 200: {"content": SSE_CONTENT}})
    async def appositive(self, req: AppositiveRequest):
        return await self._probe("/v1/appositive", "appositive", req, {"text": req.text, "mention": req.mention})

    @app.post(f"/{API_VERSION}/qa", response_model=QAResponse, responses={**KILM_ERRORS, 200: {"content": SSE_CONTENT}})
    async def qa(self, req: QARequest):
        return await self._probe("/v1/qa", "qa", req, {"question": req.question})

    @app.post(f"/{API_VERSION}/fill", response_model=FillResponse, responses={**KILM_ERRORS, 200: {"content": SSE_CONTENT}})
    async def fill(self, req: FillRequest):
        return await self._probe("/v1/fill", "fill", req, {"text": req.text})

    # -- Hugging Face TGI -------------------------------------------------------------------------

    async def _tgi(self, req: TgiRequest, stream: bool, endpoint: str):
        try:
            job = proto.tgi_job(req, int(self.settings["default_max_new_tokens"]))
        except ValueError as exc:
            raise ApiError(422, str(exc)) from None
        job["max_new_tokens"] = self._limit(job["max_new_tokens"], "parameters.max_new_tokens", 1, "max_new_tokens_limit")
        job["endpoint"] = endpoint
        if not stream:
            out = await self._call("answer", job)
            done = _done(out)
            return proto.tgi_response(req, out["tokens"], done, done["stop"])
        _, events = await self._open(job)

        async def frames():
            pending, index = None, 0  # each token goes out once the next one (or the end) is known
            async for event in self._events(events):
                if event["type"] == "token":
                    if pending is not None:
                        index += 1
                        yield proto.sse(proto.tgi_stream_event(req, index, pending))
                    pending = event
                elif event["type"] == "done":
                    last = pending or {"id": -1, "text": "", "logprob": 0.0, "special": True}
                    index += 1
                    last = {**last, "text": last["text"] + event["tail"]["text"]}
                    yield proto.sse(proto.tgi_stream_event(req, index, last, event, event["stop"]))
                elif event["type"] == "error":
                    yield proto.sse(proto.error_body("tgi", event["status"], event["error"]))

        return _sse(frames(), [events])

    @app.post("/generate", responses={**TGI_ERRORS, 200: {"content": SSE_CONTENT}})
    async def tgi_generate(self, req: TgiRequest):
        """TGI's generate: ``{generated_text, details}`` (server-sent events when the body says stream)."""
        return await self._tgi(req, req.stream, "/generate")

    @app.post("/generate_stream", responses={**TGI_ERRORS, 200: {"content": SSE_CONTENT}})
    async def tgi_generate_stream(self, req: TgiRequest):
        """TGI's generate_stream: one server-sent event per token; the last adds generated_text and details."""
        return await self._tgi(req, True, "/generate_stream")

    @app.post("/", responses={**TGI_ERRORS, 200: {"content": SSE_CONTENT}})
    async def tgi_root(self, req: TgiRequest):
        """TGI's root route (what ``InferenceClient(url).text_generation`` posts to)."""
        return await self._tgi(req, req.stream, "/")

    # -- OpenAI completions -----------------------------------------------------------------------

    @app.get("/v1/models", responses=_errors(OpenAIErrorBody, (401,)))
    async def openai_models(self):
        return proto.openai_models(self.model_id, self.created)

    @app.post("/v1/completions", responses={**OPENAI_ERRORS, 200: {"content": SSE_CONTENT}})
    async def completions(self, req: CompletionRequest):
        if req.model != self.model_id:
            raise ApiError(404, f"model: '{req.model}' is not served here; this service serves '{self.model_id}' "
                                "(GET /v1/models)", code="model_not_found")
        try:
            jobs = proto.openai_jobs(req, int(self.settings["max_batch_size"]))
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        for job in jobs:
            job["max_new_tokens"] = self._limit(job["max_new_tokens"], "max_tokens", 16, "max_new_tokens_limit")
            job["endpoint"] = "/v1/completions"
        cid, created = proto.completion_id(), int(time.time())
        if not req.stream:
            outs = await asyncio.gather(*(self._call("answer", job) for job in jobs))
            dones = [_done(o) for o in outs]
            choices = [proto.openai_choice(i, o["tokens"], d, req.logprobs) for i, (o, d) in enumerate(zip(outs, dones))]
            return proto.openai_completion(cid, self.model_id, choices, dones, created)
        opened = await asyncio.gather(*(self._open(job) for job in jobs))
        usage = bool(req.stream_options and req.stream_options.include_usage)
        streams = [s for _, s in opened]
        return _sse(self._openai_frames(req, streams, cid, created, usage), streams)

    async def _openai_frames(self, req: CompletionRequest, streams: list, cid: str, created: int, usage: bool):
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, stream) -> None:
            async for event in self._events(stream):
                await queue.put((index, event))
            await queue.put((index, None))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        offsets, dones, running = [0] * len(streams), [], len(streams)
        want_logprobs = req.logprobs is not None
        try:
            while running:
                index, event = await queue.get()
                if event is None:
                    running -= 1
                elif event["type"] == "token":
                    if event["stop"] or not (event["text"] or want_logprobs):
                        continue
                    yield proto.sse(proto.openai_chunk(cid, self.model_id, created, index, event["text"], None,
                                                       [event] if want_logprobs else None, offsets[index]))
                    offsets[index] += len(event["text"])
                elif event["type"] == "done":
                    dones.append(event)
                    yield proto.sse(proto.openai_chunk(cid, self.model_id, created, index, event["tail"]["text"],
                                                       event["finish_reason"]))
                elif event["type"] == "error":
                    yield proto.sse(proto.error_body("openai", event["status"], event["error"]))
            if usage:
                yield proto.sse({"id": cid, "object": "text_completion", "created": created, "model": self.model_id,
                                 "choices": [], "usage": proto.openai_usage(dones)})
            yield proto.SSE_DONE
        finally:
            for task in tasks:
                task.cancel()


# ----------------------------------------------------------------------------------------------
# Building and running the application
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """The deployments' version: a hash of kilm_ray's source. Serve restarts replicas whose version changed
    and only reconfigures those whose ``user_config`` did, so a new export or draining reconfigures the
    running replicas in place, while new code restarts them. (Ray 2.60 gives every ``serve.run`` a random
    version otherwise: each redeploy was a full rolling restart, model load included. Setting it takes
    Serve's internal flag; a ``serve deploy`` config gets the same from its import path.)"""
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(p for p in package.rglob("*") if p.is_file() and p.suffix in (".py", ".html")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _versioned(deployment):
    return deployment.options(version=code_version(), _internal=True)


def build_application(model_uri: str, settings: dict, draining: bool = False):
    """The bound application (ingress + model) for ``serve.run``; ``settings`` = the serve config.

    The export is the model deployment's ``user_config``: running this again with another ``model_uri``
    under the same application name rolls the new export out in place (``reconfigure``), without new
    replicas. ``draining=True`` (the ingress's ``user_config``) refuses new requests with 503."""
    s = settings
    logging_config = {"encoding": s["log_encoding"], "enable_access_log": s["access_log"]}
    # Serve also writes every replica log line to stderr, which Ray forwards to the driver: a second copy of
    # each request line, shipped and printed at the request rate. The files under logs/serve keep them all.
    quiet = {"runtime_env": {"env_vars": {"RAY_SERVE_LOG_TO_STDERR": "1" if s["log_to_stderr"] else "0"}}}
    graceful = {"graceful_shutdown_timeout_s": float(s["drain_timeout_s"]), "graceful_shutdown_wait_loop_s": 0.5}
    model_options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": s["num_cpus"], "num_gpus": s["num_gpus"], **quiet},
        "max_ongoing_requests": s["max_ongoing_requests"],
        "max_queued_requests": s["max_queued_requests"],
        # The ingress logs each HTTP request; a second line per internal call would cost the busiest process.
        "user_config": {"model": str(model_uri)}, "logging_config": dict(logging_config, enable_access_log=False),
        **graceful,
    }
    if s["autoscaling"]:
        model_options["autoscaling_config"] = {"min_replicas": s["min_replicas"], "max_replicas": s["max_replicas"],
                                               "target_ongoing_requests": s["target_ongoing_requests"]}
    else:
        model_options["num_replicas"] = s["num_replicas"]
    model = _versioned(KilmModel.options(**model_options)).bind(s)
    admission = admission_limit(s)
    ingress = _versioned(ProbeAPI.options(
        ray_actor_options={"num_cpus": s["ingress_cpus"], **quiet},
        num_replicas=s["ingress_replicas"],
        # Our gate answers 503 at `admission`; Serve's own limit sits above it (room for the fast 503s) and
        # Serve never queues for the ingress, so every 503 a client sees has the same JSON body.
        max_ongoing_requests=admission + 64 if admission else max(s["max_ongoing_requests"], 2 * s["max_batch_size"]),
        max_queued_requests=-1,
        user_config={"draining": bool(draining)}, logging_config=logging_config, **graceful,
    ))
    return ingress.bind(model, s)


def app_builder(args: dict):
    """``serve run kilm_ray.serve.app:app_builder model=DIR [config=YAML] [serve.port=...]`` and Serve
    config files (``import_path: kilm_ray.serve.app:app_builder``)."""
    from kilm_ray.config import load_config

    args = dict(args)
    model = args.pop("model", None)
    if not model:
        raise ValueError("app_builder needs model=<export directory or s3:// URI>")
    config = args.pop("config", None)
    if config and not os.path.isabs(config) and not os.path.exists(config):
        # Serve builds the app in its controller, whose working directory is not the checkout.
        in_checkout = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), config)
        config = in_checkout if os.path.exists(in_checkout) else config
    overrides = [f"{k}={v}" for k, v in args.items()]
    cfg = load_config(config, overrides)
    return build_application(model, cfg.to_dict()["serve"])


ROUTES_LINE = ("probes POST /v1/describe /v1/disambiguate /v1/appositive /v1/qa /v1/fill; TGI POST /generate "
               "/generate_stream; OpenAI POST /v1/completions; a page at /; schema at /docs")


def run_service(model_uri: str, serve_settings: dict):
    """Start Serve's HTTP proxy on host:port and deploy the application; returns (handle, url)."""
    serve.start(http_options={"host": serve_settings["host"], "port": serve_settings["port"]})
    handle = serve.run(build_application(model_uri, serve_settings), name=serve_settings["app_name"],
                       route_prefix="/", blocking=False)
    url = f"http://{serve_settings['host']}:{serve_settings['port']}"
    log.info("kilm probes served at %s (%s)", url, ROUTES_LINE)
    return handle, url


class StopSignals:
    """SIGTERM (what systemd and Kubernetes send) and SIGINT (Ctrl-C) as a request to stop gracefully,
    instead of Ray's fatal-signal handler and its stack dump; a second signal cuts the wait short."""

    def __init__(self):
        self.event = threading.Event()
        self.received: list[str] = []

    def install(self) -> "StopSignals":
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received.append(signal.Signals(signum).name)
        self.event.set()

    def wait(self) -> str:
        while not self.event.wait(0.5):
            pass
        return self.received[0]

    @property
    def forced(self) -> bool:
        return len(self.received) > 1


def drain_and_stop(model_uri: str, settings: dict, signals: StopSignals, owns_ray: bool) -> str:
    """Refuse new requests (503), let those in flight finish for at most ``serve.drain_timeout_s``, stop
    Serve (and the local Ray this process started); returns the one line to print."""
    import ray

    started = time.monotonic()
    name = settings["app_name"]
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # the redeploy's INFO lines: not the user's news
    ingress = serve.get_app_handle(name)
    in_flight = left = 0
    try:
        in_flight = ingress.in_flight.remote().result(timeout_s=10)
        serve.run(build_application(model_uri, settings, draining=True), name=name, route_prefix="/", blocking=False)
        deadline = started + float(settings["drain_timeout_s"])
        while not signals.forced:
            left = ingress.in_flight.remote().result(timeout_s=10)
            if left == 0 or time.monotonic() >= deadline:
                break
            time.sleep(0.2)
    except Exception as exc:  # noqa: BLE001 - stopping anyway
        log.warning("draining failed (%s: %s); stopping now", type(exc).__name__, exc)
    if owns_ray:  # the whole local Ray goes (serve.shutdown first leaves task-failure lines on the terminal)
        ray.shutdown()
    else:
        serve.delete(name)
    took = time.monotonic() - started
    cut = f", {left} cut off at the {settings['drain_timeout_s']} s limit" if left else ""
    return (f"kilm-ray serve: stopped on {signals.received[0]} in {took:.1f} s: {in_flight} request(s) in flight "
            f"finished{cut}; new requests got 503 meanwhile")
