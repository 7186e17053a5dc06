"""What every request passes before and after its route: the bearer token, draining, admission (503 in
the route's protocol before Serve's own queue would answer), the body limit counted on the bytes actually
received, every error as JSON in the route's protocol, and the count of each answer (metrics and one log
line), a streamed one at its last byte.

A route class rather than a middleware: Serve's class-based ingress keeps the routes it is given. The
routes themselves are ``api.py``'s.
"""

# No "from __future__ import annotations": FastAPI must see real types.

import asyncio
import hmac
import importlib
import logging
import time
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
OPEN_ROUTES = {("GET", "/"), ("GET", "/healthz")}  # no bearer token: the page (static) and health checks
RETRY_AFTER_S = 1


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


def current_gate() -> Gate:
    # Serve may ship this module's classes by value: always reach the importable module's gate.
    return importlib.import_module("kilm_ray.serve.gate")._GATE


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


class GatedRoute(APIRoute):
    """Auth, draining, admission and the streamed body limit run here, before FastAPI reads and validates
    the body; every error becomes JSON in the route's protocol; a streamed answer stays counted in flight
    until its last byte."""

    def get_route_handler(self):
        handler = super().get_route_handler()
        path = self.path

        async def gated(request: Request):
            gate = current_gate()
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


def sse_response(frames: AsyncIterator[bytes], streams: Sequence[Any]) -> CountedStream:
    """A server-sent-events answer over the given model streams (cancelled if the answer does not finish)."""
    response = CountedStream(frames, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    response.streams = list(streams)
    return response
