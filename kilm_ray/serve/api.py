"""The ingress: a FastAPI application whose routes validate, translate the protocols and stream, and call
the model deployment through its handle (``replica.KilmModel``); every route passes ``gate.GatedRoute``.

Routes: the probe API (``/v1/describe``, ``/v1/disambiguate``, ``/v1/appositive``, ``/v1/qa``, ``/v1/fill``,
streaming with ``"stream": true``), Hugging Face TGI (``POST /generate``, ``/generate_stream``, ``/``),
OpenAI completions (``POST /v1/completions``, ``GET /v1/models``), a page to try probes (``GET /``), and
``/docs`` + ``/openapi.json``. Errors are JSON in the route's protocol (``protocols.error_body``).
"""

# No "from __future__ import annotations": FastAPI must see real types on the ingress methods.

import asyncio
import hashlib
import logging
import os
import time
from pathlib import Path
from typing import AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from kilm_ray.serve import protocols as proto
from kilm_ray.serve.gate import (
    ApiError, GatedRoute, current_gate, error_response, protocol_of, ray_failure, service_token, sse_response,
    validation_error,
)
from kilm_ray.serve.protocols import (
    BusyErrorBody, CompletionRequest, ErrorBody, OpenAIErrorBody, TgiErrorBody, TgiRequest, ValidationErrorBody,
)
from kilm_ray.serve.schemas import (
    AppositiveRequest, AppositiveResponse, DescribeRequest, DescribeResponse, DisambiguateRequest,
    DisambiguateResponse, FillRequest, FillResponse, QARequest, QAResponse,
)

log = logging.getLogger("kilm_ray.serve")

API_VERSION = "v1"
PAGE = Path(__file__).with_name("static") / "index.html"
GENERATING_PROBES = ("/v1/describe", "/v1/appositive", "/v1/qa", "/v1/fill")


app = FastAPI(title="kilm_ray knowledge probes", version=API_VERSION, docs_url=None, redoc_url=None,
              openapi_url=None, description="Probe the entity knowledge injected into BART by KILM; or call the "
                                            "model through TGI's or OpenAI's text-generation protocol.")
app.router.route_class = GatedRoute


def _errors(model, codes, validation=None) -> dict:
    out = {code: {"model": model, "description": "error"} for code in codes}
    if validation is not None:
        out[422] = {"model": validation, "description": "the request does not fit the endpoint"}
    return out


KILM_ERRORS = {**_errors(ErrorBody, (400, 401, 408, 413, 415, 500), ValidationErrorBody),
               503: {"model": BusyErrorBody, "description": "full, stopping, or a replica restarting: retry later"}}
TGI_ERRORS = _errors(TgiErrorBody, (400, 401, 413, 415, 424, 429), TgiErrorBody)
OPENAI_ERRORS = _errors(OpenAIErrorBody, (400, 401, 404, 413, 415, 500, 503))
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


async def _answer_of(awaitable):
    """What a call to the model deployment gave; its failure as the JSON error the client gets."""
    try:
        return await awaitable
    except Exception as exc:  # noqa: BLE001 - mapped to a JSON answer
        raise ray_failure(exc) from None


def _unless_refused(event: dict) -> dict:
    """The replica's answer or first event, unless it is an error event: then the client's error."""
    if event.get("type") == "error":
        raise ApiError(int(event["status"]), event["error"], code=event.get("code"))
    return event


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
        gate = current_gate()
        gate.max_request_bytes = int(settings["max_request_bytes"])
        gate.body_timeout_s = float(settings["body_timeout_s"])
        gate.token = service_token(settings, dict(os.environ))  # no token where one is required: no service
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
        current_gate().draining = bool(config.get("draining", False))

    async def in_flight(self) -> int:
        """Requests this ingress replica is answering (a graceful stop waits for 0)."""
        return current_gate().in_flight

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

    async def _call_raw(self, method: str, *args):
        """A model deployment method's own answer; a failed call as the JSON error the client gets."""
        return await _answer_of(getattr(self.model, method).remote(*args))

    async def _call(self, method: str, job: dict) -> dict:
        return (await self._call_all(method, [job]))[0]

    async def _call_all(self, method: str, jobs: list[dict]) -> list[dict]:
        """Every job's answer; when one fails, the others are cancelled (no replica works for nobody)."""
        responses = [getattr(self.model, method).remote(job) for job in jobs]
        outs = []
        try:
            for response in responses:
                outs.append(_unless_refused(await _answer_of(response)))
        except BaseException:
            for response in responses:
                response.cancel()
            raise
        return outs

    async def _open(self, job: dict):
        return (await self._open_all([job]))[0]

    async def _open_all(self, jobs: list[dict]) -> list:
        """Start streamed answers; each one's first event is checked first, so a bad request is still a
        4xx, and when one is refused the streams already opened are cancelled."""
        streams = [self.model.options(stream=True).stream.remote(job) for job in jobs]
        try:
            for stream in streams:
                _unless_refused(await _answer_of(stream.__anext__()))
        except BaseException:
            for stream in streams:
                stream.cancel()
            raise
        return streams

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
        stream = await self._open(job)

        async def frames():
            async for event in self._events(stream):
                for frame in proto.probe_frames(event):
                    yield frame

        return sse_response(frames(), [stream])

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
        from kilm_ray.method.tokenizer import KILM_TOKENS

        info = await self._call_raw("info")
        s = self.settings
        # What a client needs to call the model well; no storage URI, path or process detail of the deployment.
        public = {k: info[k] for k in ("device", "dtype", "parameters", "batching", "waiting")}
        export_id = hashlib.sha256(str(info["model"]).encode()).hexdigest()[:12]  # changes with a rollout
        return {**public, "api_version": API_VERSION, "special_tokens": KILM_TOKENS, "id": self.model_id,
                "export_id": export_id,
                "step": info["meta"].get("step"),
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
            job = proto.tgi_job(req, int(self.settings["default_max_new_tokens"]), int(self.settings["max_stop_chars"]))
        except ValueError as exc:
            raise ApiError(422, str(exc)) from None
        job["max_new_tokens"] = self._limit(job["max_new_tokens"], "parameters.max_new_tokens", 1, "max_new_tokens_limit")
        job["endpoint"] = endpoint
        if not stream:
            out = await self._call("answer", job)
            done = _done(out)
            return proto.tgi_response(req, out["tokens"], done, done["stop"])
        events = await self._open(job)

        async def frames():
            pending, index, streamed = None, 0, ""  # each token goes out once the next one (or the end) is known
            async for event in self._events(events):
                if event["type"] == "token":
                    if pending is not None:
                        index += 1
                        streamed += pending["raw"]
                        yield proto.sse(proto.tgi_stream_event(req, index, pending))
                    pending = event
                elif event["type"] == "done":
                    if pending is None:  # TGI has no empty answer (and no fake token): a validation error
                        yield proto.stream_error("tgi", {"status": 422, "error": "nothing was generated: the input "
                                                                                 "leaves the model no position"})
                        return
                    index += 1
                    last = {**pending, "raw": proto.tgi_last_text(streamed, pending, event, event["stop"])}
                    yield proto.sse(proto.tgi_stream_event(req, index, last, event, event["stop"]))
                elif event["type"] == "error":
                    yield proto.stream_error("tgi", event)

        return sse_response(frames(), [events])

    @app.post("/generate", responses=TGI_ERRORS)
    async def tgi_generate(self, req: TgiRequest):
        """TGI's generate: ``{generated_text, details}``; a ``stream`` field is ignored, as TGI does (its
        streaming route is /generate_stream)."""
        return await self._tgi(req, False, "/generate")

    @app.post("/generate_stream", responses={**TGI_ERRORS, 200: {"content": SSE_CONTENT}})
    async def tgi_generate_stream(self, req: TgiRequest):
        """TGI's generate_stream: one server-sent event per token; the last adds generated_text and details."""
        return await self._tgi(req, True, "/generate_stream")

    @app.post("/", responses={**TGI_ERRORS, 200: {"content": SSE_CONTENT}})
    async def tgi_root(self, req: TgiRequest):
        """TGI's root route (what ``InferenceClient(url).text_generation`` posts to)."""
        return await self._tgi(req, req.stream, "/")

    @app.get("/info")
    async def tgi_info(self) -> dict:
        """TGI's ``/info``: the model and the server's limits, as TGI's clients and routers read them."""
        from kilm_ray import __version__

        info = await self._call_raw("info")
        return proto.tgi_info(self.model_id, self.settings, info["device"], info["dtype"], __version__,
                              current_gate().max_in_flight)

    @app.get("/health", responses=TGI_ERRORS)
    async def tgi_health(self):
        """TGI's ``/health``: 200 once a model replica answers (503 while none does)."""
        await self._call_raw("info")
        return Response(status_code=200)

    @app.post("/tokenize", responses=TGI_ERRORS)
    async def tgi_tokenize(self, req: TgiRequest) -> list:
        """TGI's ``/tokenize``: the input's tokens (id, text, start, stop) as the model's tokenizer splits it."""
        return await self._call_raw("tokenize", {"text": req.inputs})

    @app.get("/metrics", include_in_schema=False)
    async def metrics_elsewhere(self):
        raise ApiError(404, proto.METRICS_REFUSED)

    # -- OpenAI completions -----------------------------------------------------------------------

    @app.get("/v1/models", responses=_errors(OpenAIErrorBody, (401,)))
    async def openai_models(self):
        return proto.openai_models(self.model_id, self.created)

    @app.get("/v1/models/{model_id}", responses=_errors(OpenAIErrorBody, (401, 404)))
    async def openai_model(self, model_id: str):
        if model_id != self.model_id:
            raise ApiError(404, f"model: '{model_id}' is not served here; this service serves '{self.model_id}'",
                           code="model_not_found")
        return proto.openai_model(self.model_id, self.created)

    @app.post("/v1/chat/completions", responses=_errors(OpenAIErrorBody, (401, 404)))
    async def openai_chat(self):
        """Refused in OpenAI's shape: the model is not a chat model (the message says what to call instead)."""
        raise ApiError(404, proto.CHAT_REFUSED, code="unsupported_endpoint")

    @app.post("/v1/completions", responses={**OPENAI_ERRORS, 200: {"content": SSE_CONTENT}})
    async def completions(self, req: CompletionRequest, request: Request):
        if req.model != self.model_id:
            raise ApiError(404, f"model: '{req.model}' is not served here; this service serves '{self.model_id}' "
                                "(GET /v1/models)", code="model_not_found")
        try:
            jobs = proto.openai_jobs(req, int(self.settings["max_batch_size"]), int(self.settings["max_stop_chars"]))
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        for job in jobs:
            job["max_new_tokens"] = self._limit(job["max_new_tokens"], "max_tokens", 16, "max_new_tokens_limit")
            job["endpoint"] = "/v1/completions"
        current_gate().take_more(request, len(jobs) - 1)  # one admission slot per prompt
        if len(jobs) > 1:  # all prompts checked before any generates: a refused one costs the others nothing
            refused = await self._call_raw("check", jobs)  # None when every prompt passes
            if refused is not None:
                _unless_refused(refused)
        cid, created = proto.completion_id(), int(time.time())
        if not req.stream:
            outs = await self._call_all("answer", jobs)
            dones = [_done(o) for o in outs]
            choices = [proto.openai_choice(i, o["tokens"], d, req.logprobs) for i, (o, d) in enumerate(zip(outs, dones))]
            return proto.openai_completion(cid, self.model_id, choices, dones, created)
        streams = await self._open_all(jobs)
        usage = bool(req.stream_options and req.stream_options.include_usage)
        return sse_response(self._openai_frames(req, streams, cid, created, usage), streams)

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
                                                       [event] if want_logprobs else None, offsets[index], usage))
                    offsets[index] += len(event["text"])
                elif event["type"] == "done":
                    dones.append(event)
                    yield proto.sse(proto.openai_chunk(cid, self.model_id, created, index, event["tail"]["text"],
                                                       event["finish_reason"], with_usage=usage))
                elif event["type"] == "error":
                    yield proto.stream_error("openai", event)
            if usage:
                yield proto.sse({"id": cid, "object": "text_completion", "created": created, "model": self.model_id,
                                 "choices": [], "usage": proto.openai_usage(dones)})
            yield proto.SSE_DONE
        finally:
            for task in tasks:
                task.cancel()
