"""What every request passes before and after its route: the bearer token, draining, a JSON content type,
the body limit counted on the bytes actually received and a deadline for the whole body, admission (503 in
the route's protocol before Serve's own queue would answer: taken once the body is in, one slot per model
job), every error as JSON in the route's protocol, and the count of each answer (metrics and one log line),
a streamed one at its last byte.

The order is the defence: a request that is not allowed costs no read; a body that trickles in holds no
admission slot and is cut at ``serve.body_timeout_s`` (Ray's proxy timeout can be switched off by a client
header, ``x-request-timeout-seconds: 0``); a failure's details go to the log under an id, never to the client.

A route class rather than a middleware: Serve's class-based ingress keeps the routes it is given. The
routes themselves are ``api.py``'s.
"""

# No "from __future__ import annotations": FastAPI must see real types.

import asyncio
import hmac
import importlib
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Optional, Sequence

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from kilm_ray.serve import protocols as proto

log = logging.getLogger("kilm_ray.serve")
request_log = logging.getLogger("ray.serve")  # Serve formats it (JSON with logging_config) and adds the request id
OPEN_ROUTES = {("GET", "/"), ("GET", "/healthz"), ("GET", "/health")}  # no token: the page (static), health checks
PROBE_ROUTES = ("/v1/describe", "/v1/disambiguate", "/v1/appositive", "/v1/qa", "/v1/fill", "/v1/model")
RETRY_AFTER_S = 1


class ApiError(Exception):
    """An answer other than 2xx; written as JSON in the route's protocol by the gate."""

    def __init__(self, status: int, message: str, problems: Optional[list[str]] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.problems, self.code = status, message, problems, code


def protocol_of(method: str, path: str) -> str:
    """The protocol whose error shape a path gets: TGI's routes, OpenAI's (every /v1 path that is not a probe
    route, so an unknown one such as /v1/chat/... is a 404 an OpenAI client can read), else ours."""
    if path in ("/generate", "/generate_stream", "/info", "/health", "/tokenize", "/metrics") or \
            (path == "/" and method == "POST"):
        return "tgi"
    if path.startswith("/v1/") and path not in PROBE_ROUTES:
        return "openai"
    return "kilm"


def error_response(protocol: str, status: int, message: str, problems: Optional[list[str]] = None,
                   code: Optional[str] = None) -> JSONResponse:
    busy = status == 503
    status = proto.protocol_status(protocol, status, code)
    headers = {}
    if busy:
        headers["Retry-After"] = str(RETRY_AFTER_S)
        message = message if message.endswith("retry later") else f"{message}; retry later"
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    body = proto.error_body(protocol, status, message, problems, RETRY_AFTER_S if busy else None, code)
    return JSONResponse(status_code=status, content=body, headers=headers)


def validation_error(exc: RequestValidationError) -> ApiError:
    problems = []
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            return ApiError(400, f"request body is not valid JSON: {err.get('msg')}")
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        problems.append(f"{where}: {err.get('msg')}")
    return ApiError(422, "; ".join(problems), problems)


def logged_under_an_id(what: str, exc: BaseException) -> str:
    """The message of a failure that names no internals: the exception (paths, URIs, library text) goes to
    the log under an id the client gets, so an operator can find it and a client learns nothing about the
    deployment. (The ingress's 500s and the model replica's failed batches alike.)"""
    error_id = uuid.uuid4().hex[:12]
    log.error("%s (error id %s): %s: %s", what, error_id, type(exc).__name__, exc)
    return f"{what} (error id {error_id}; the service log has the details)"


def internal_error(what: str, exc: BaseException) -> ApiError:
    return ApiError(500, logged_under_an_id(what, exc))


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
        return internal_error("the model failed on this request", cause)
    return internal_error("internal error", exc)


@dataclass
class Gate:
    """The bearer token, draining (a graceful stop in progress), admission (so the ingress answers 503 in
    our format before Serve's own queue would), and the body limit counted on the bytes actually received
    (a chunked body has no Content-Length) within ``body_timeout_s``.

    ``in_flight`` counts model jobs, not HTTP requests: an OpenAI prompt list of 32 holds 32 slots."""

    max_request_bytes: int = 65536
    body_timeout_s: float = 10.0
    token: Optional[str] = None
    max_in_flight: int = 0  # 0: no limit
    in_flight: int = 0
    draining: bool = False
    metrics: dict = field(default_factory=dict)

    def at_capacity(self, wanted: int = 1) -> bool:
        return bool(self.max_in_flight) and self.in_flight + wanted > self.max_in_flight

    def hold(self, request: Request, slots: int) -> None:
        """Count ``slots`` more model jobs in flight for ``request``; all of them go when it ends (``_release``)."""
        self.in_flight += slots
        request.state.kilm_slots = getattr(request.state, "kilm_slots", 0) + slots
        _observe(self, "in_flight", self.in_flight)

    def take_more(self, request: Request, more: int) -> None:
        """Slots for the extra model jobs of one request (an OpenAI prompt list), released with its own; 503
        when they are not free, so one request never runs more jobs than admission allows."""
        if more <= 0:
            return
        if self.at_capacity(more):
            raise ApiError(503, f"the service is at capacity ({self.in_flight} model jobs in flight; this request "
                                f"needs {more + 1})")
        self.hold(request, more)

    def unauthorized(self, method: str, path: str, authorization: Optional[str]) -> bool:
        if self.token is None or (method, path) in OPEN_ROUTES:
            return False
        expected = f"Bearer {self.token}".encode()
        return not authorization or not hmac.compare_digest(authorization.encode(), expected)


_GATE = Gate()

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class AuthSetupError(RuntimeError):
    """The service was asked to require a token and has none: it does not start (rather than start open)."""


def bearer_token(settings: dict, environ: dict) -> Optional[str]:
    """The service's bearer token: from ``serve.auth_token_file`` (a mounted secret) or the environment
    variable ``serve.auth_token_env``; never a config value (Serve shows application configs on its dashboard)."""
    path = settings.get("auth_token_file")
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as exc:
            raise AuthSetupError(f"serve.auth_token_file: cannot read {path}: {exc.strerror or exc}") from None
        if not token:
            raise AuthSetupError(f"serve.auth_token_file: {path} is empty")
        return token
    return environ.get(settings.get("auth_token_env") or "KILM_SERVE_TOKEN") or None


def auth_required(settings: dict) -> bool:
    mode = settings.get("auth", "auto")
    return mode == "required" or (mode == "auto" and str(settings.get("host")) not in LOOPBACK_HOSTS)


def service_token(settings: dict, environ: dict) -> Optional[str]:
    """The token the gate checks (None: open); AuthSetupError when auth is required and there is none."""
    if settings.get("auth") == "open":
        return None
    token = bearer_token(settings, environ)
    if token is None and auth_required(settings):
        raise AuthSetupError(
            f"the probe service requires a bearer token (serve.auth={settings.get('auth', 'auto')}, serve.host="
            f"{settings.get('host')}) and has none: set the environment variable "
            f"{settings.get('auth_token_env') or 'KILM_SERVE_TOKEN'} on every node or serve.auth_token_file, "
            "or serve.auth=open to serve without one (anyone who reaches the port may call the model)")
    return token


def current_gate() -> Gate:
    # Serve may ship this module's classes by value: always reach the importable module's gate.
    return importlib.import_module("kilm_ray.serve.gate")._GATE


async def _read_limited(request: Request, limit: int, timeout_s: float) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"request body is {length} bytes; the limit is {limit}")
    body = bytearray()

    async def read() -> None:
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > limit:  # stop reading: the rest is never buffered
                raise ApiError(413, f"request body is over {limit} bytes (the limit)")

    try:
        await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout_s:g} s ({len(body)} bytes came)") from None
    return bytes(body)


def json_content_type_problem(content_type: Optional[str]) -> Optional[str]:
    """Why a POST body's declared type is refused, or None. JSON only: ``text/plain``, form types and no type
    at all are what a web page may send cross-site without a CORS preflight, so taking them would let any
    page make a visitor's browser call an open service."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media == "application/json" or (media.startswith("application/") and media.endswith("+json")):
        return None
    said = f"'{media}'" if media else "none"
    return (f"Content-Type must be application/json (this request's: {said}); with curl add "
            "-H 'Content-Type: application/json'")


def _replayed(request: Request, body: bytes) -> Request:
    """The same request with its (already read) body replayed to FastAPI."""
    scope = dict(request.scope)
    scope.setdefault("state", {})
    replayed = False

    async def receive():
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await request.receive()

    return Request(scope, receive)


class GatedRoute(APIRoute):
    """Auth, draining, the content type, the streamed body limit and deadline, then admission run here,
    before FastAPI validates the body; every error becomes JSON in the route's protocol; a streamed answer
    stays counted in flight until its last byte."""

    def get_route_handler(self):
        handler = super().get_route_handler()
        path = self.path

        async def gated(request: Request):
            gate = current_gate()
            started = time.perf_counter()
            protocol = protocol_of(request.method, path)
            request, response = await _admitted(request, path, protocol, gate)
            if response is None:
                gate.hold(request, 1)
                try:
                    response = await _answer(handler, request, protocol)
                finally:
                    if isinstance(response, CountedStream):
                        response.on_end = lambda status: _end_stream(gate, request, path, started, status)
                    else:
                        _release(gate, request)
                if isinstance(response, CountedStream):
                    return response
            _record(gate, request.method, path, response.status_code, time.perf_counter() - started)
            return response

        return gated


async def _admitted(request: Request, path: str, protocol: str, gate: Gate):
    """``(request, None)`` when the request may take an admission slot (its body, if any, read and replayed
    in the returned request); else ``(request, error answer)``. Nothing is read before the token and the
    content type pass."""
    if gate.unauthorized(request.method, path, request.headers.get("authorization")):
        return request, error_response(protocol, 401, "missing or wrong bearer token (Authorization: Bearer <token>)")
    if gate.draining:
        return request, error_response(protocol, 503, "the service is stopping")
    if request.method in ("POST", "PUT", "PATCH"):
        problem = json_content_type_problem(request.headers.get("content-type"))
        if problem:
            return request, error_response(protocol, 415, problem)
        try:
            request = _replayed(request, await _read_limited(request, gate.max_request_bytes, gate.body_timeout_s))
        except ApiError as exc:
            return request, error_response(protocol, exc.status, exc.message)
        except ClientDisconnect:
            return request, error_response(protocol, 499, "the client left before its body was read")
    if gate.at_capacity():
        return request, error_response(protocol, 503,
                                       f"the service is at capacity ({gate.in_flight} model jobs in flight)")
    return request, None


async def _answer(handler, request: Request, protocol: str):
    try:
        return await handler(request)
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


def _release(gate: Gate, request: Request) -> None:
    gate.in_flight -= request.state.kilm_slots
    _observe(gate, "in_flight", gate.in_flight)


class CountedStream(StreamingResponse):
    """A streamed answer that calls ``on_end(status)`` once its ASGI call ends: 200 when every byte was sent,
    499 when the client left or the call was cancelled (also before the body began), 500 when the body
    failed. An answer that did not finish cancels its model streams (``streams``), so the replica stops
    generating for nobody. (Counting in a wrapper of the body iterator leaked the in-flight slot when
    Starlette never started the body: a generator that never ran runs no ``finally``; enough leaks and every
    request is a 503 "at capacity".)

    "Every byte was sent" is known from the body iterator, not from ``__call__`` returning: under ASGI spec
    2.3 (what uvicorn reports) Starlette watches for the client's disconnect and, when it comes, stops the
    body and returns normally."""

    on_end: Optional[Callable[[int], None]] = None
    streams: Sequence[Any] = ()

    def __init__(self, content: AsyncIterator[bytes], **kwargs) -> None:
        self.finished = False
        super().__init__(self._to_the_end(content), **kwargs)

    async def _to_the_end(self, content: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for chunk in content:
            yield chunk
        self.finished = True

    async def __call__(self, scope, receive, send) -> None:
        status = 500
        try:
            await super().__call__(scope, receive, send)
            status = 200 if self.finished else 499
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


def _end_stream(gate: Gate, request: Request, path: str, started: float, status: int) -> None:
    _release(gate, request)
    _record(gate, request.method, path, status, time.perf_counter() - started)


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


def sse_response(frames: AsyncIterator[bytes], streams: Sequence[Any]) -> CountedStream:
    """A server-sent-events answer over the given model streams (cancelled if the answer does not finish)."""
    response = CountedStream(frames, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    response.streams = list(streams)
    return response
