"""The Ray Serve application: a FastAPI ingress that checks and reads requests, builds prompts, and a
model deployment that answers them in dynamic batches (``@serve.batch``).

    HTTP --> gate (auth, admission, streamed body limit) --> ProbeAPI (FastAPI, CPU, tokenizes, builds prompts)
         --handle--> KilmModel (batched generate / score, CPU or GPU)

The export to serve is the deployments' ``user_config`` (``{"model": uri}``): a new export is rolled out
by ``reconfigure`` while the old one keeps answering (no restart, no failed request). Prompts and parsing
come from ``kilm_ray.probes``, generation and scoring from ``kilm_ray.generation``: the evaluation harness
uses the same functions.

Metrics (``ray.serve.metrics``, on Ray's Prometheus endpoint, tagged with deployment and replica):
``kilm_http_requests`` (endpoint, status), ``kilm_http_request_latency_ms`` (endpoint), ``kilm_http_in_flight``,
``kilm_model_batch_size`` (method), ``kilm_model_waiting_requests``, ``kilm_generated_tokens`` (endpoint).
Each request is logged once by the ingress on the ``ray.serve`` logger (structured, with Serve's request id).
"""

# No "from __future__ import annotations": FastAPI must see real types on the ingress methods.

import asyncio
import hmac
import importlib
import json
import logging
import os
import resource
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Optional

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from kilm_ray.serve.schemas import (
    AppositiveRequest, AppositiveResponse, DescribeRequest, DescribeResponse, DisambiguateRequest,
    DisambiguateResponse, FillRequest, FillResponse, MentionInContext, QARequest, QAResponse, RankedCandidate,
)

log = logging.getLogger("kilm_ray.serve")
request_log = logging.getLogger("ray.serve")  # Serve formats it (JSON with logging_config) and adds the request id
API_VERSION = "v1"
OPEN_PATHS = ("/healthz",)  # no bearer token needed (load balancer health checks)
RETRY_AFTER_S = 1


def busy_response(reason: str) -> JSONResponse:
    """The one 503 the service gives, whether the ingress or the model queue is full."""
    return JSONResponse(status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)},
                        content={"error": f"{reason}; retry later", "retry_after_s": RETRY_AFTER_S})


# ----------------------------------------------------------------------------------------------
# The model deployment
# ----------------------------------------------------------------------------------------------


class BatchStats:
    def __init__(self) -> None:
        self.batches = 0
        self.requests = 0
        self.largest = 0
        self.histogram: dict[int, int] = defaultdict(int)

    def record(self, size: int) -> None:
        self.batches += 1
        self.requests += size
        self.largest = max(self.largest, size)
        self.histogram[size] += 1

    def summary(self) -> dict:
        return {"batches": self.batches, "requests": self.requests, "largest_batch": self.largest,
                "mean_batch": self.requests / self.batches if self.batches else 0.0,
                "histogram": dict(sorted(self.histogram.items()))}


@dataclass
class LoadedModel:
    uri: str
    model: Any
    tokenizer: Any
    sp: Any
    meta: dict
    vocab: str  # tokenizer fingerprint

    @classmethod
    def load(cls, uri: str, device: str, dtype: str) -> "LoadedModel":
        from kilm_ray import storage
        from kilm_ray.model import load_export
        from kilm_ray.tokenizer import special_ids, tokenizer_fingerprint

        with storage.materialized(uri) as local:  # a download is removed once the weights are in memory
            model, tokenizer, meta = load_export(local, device=device, dtype=dtype)
        return cls(uri, model, tokenizer, special_ids(tokenizer), meta, tokenizer_fingerprint(tokenizer))


STALE_VOCAB = {"stale_vocab": True}


@serve.deployment(name="KilmModel")
class KilmModel:
    """Holds one copy of the exported model; ``generate`` and ``score`` are batched across requests."""

    def __init__(self, settings: dict):
        import torch
        from ray.serve.metrics import Counter, Gauge, Histogram

        from kilm_ray.generation import default_device

        self.settings = settings
        self.device = default_device(settings.get("device", "auto"))
        dtype = settings.get("dtype", "auto")
        if dtype == "auto":  # V100 has no bf16: fp16 there
            dtype = "fp32" if self.device != "cuda" else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
        self.dtype = dtype
        self.loaded: Optional[LoadedModel] = None
        self.stats = BatchStats()
        self.waiting = 0
        torch.set_grad_enabled(False)
        for handler in (self.generate_batch, self.score_batch):
            handler.set_max_batch_size(int(settings["max_batch_size"]))
            handler.set_batch_wait_timeout_s(float(settings["batch_wait_timeout_s"]))
        self.m_batch = Histogram("kilm_model_batch_size", description="requests per model call",
                                 boundaries=[1, 2, 4, 8, 16, 32, 64, 128], tag_keys=("method",))
        self.m_waiting = Gauge("kilm_model_waiting_requests", description="requests queued or running in this replica")
        self.m_tokens = Counter("kilm_generated_tokens", description="tokens generated", tag_keys=("endpoint",))

    async def reconfigure(self, config: dict) -> None:
        """A new export (``user_config.model``): loaded in a thread while the current one keeps answering,
        then swapped in between two batches."""
        uri = str(config["model"])
        if self.loaded is not None and self.loaded.uri == uri:
            return
        self.loaded = await asyncio.to_thread(LoadedModel.load, uri, self.device, self.dtype)
        log.info("model replica now serves %s", uri)

    async def _queued(self, handler, request: dict) -> dict:
        if request.get("vocab") != self.loaded.vocab:
            return STALE_VOCAB  # the ingress tokenized with another export's tokenizer (mid-rollout)
        self.waiting += 1
        self.m_waiting.set(self.waiting)
        try:
            return await handler(request)
        finally:
            self.waiting -= 1
            self.m_waiting.set(self.waiting)

    async def generate(self, request: dict) -> dict:
        return await self._queued(self.generate_batch, request)

    async def score(self, request: dict) -> dict:
        return await self._queued(self.score_batch, request)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def generate_batch(self, requests: list[dict]) -> list[dict]:
        self.stats.record(len(requests))
        self.m_batch.observe(len(requests), tags={"method": "generate"})
        # The model runs on this (user-code) event loop, not in a worker thread: Serve keeps health checks
        # on its own loop, requests queue up while a batch runs, and the next batch takes them all. A thread
        # here fought the loop for the GIL and starved batching (mean batch 1.3 vs 14, bench/serve_load.py).
        return self._generate(self.loaded, requests)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def score_batch(self, requests: list[dict]) -> list[dict]:
        self.stats.record(len(requests))
        self.m_batch.observe(len(requests), tags={"method": "score"})
        return self._score(self.loaded, requests)

    def _generate(self, m: LoadedModel, requests: list[dict]) -> list[dict]:
        from kilm_ray.generation import generate, generation_groups

        rows = [(len(r["decoder_prefix"]), r["max_new_tokens"], r["num_beams"], tuple(r["stop_ids"])) for r in requests]
        results: list[Optional[dict]] = [None] * len(requests)
        for index in generation_groups(rows, m.model.config.max_position_embeddings):
            outs = generate(m.model, [requests[i]["encoder_ids"] for i in index],
                            [requests[i]["decoder_prefix"] for i in index], m.sp.pad, m.sp.eos,
                            [requests[i]["stop_ids"] for i in index], [requests[i]["max_new_tokens"] for i in index],
                            requests[index[0]]["num_beams"])
            for i, out in zip(index, outs):
                results[i] = {"tokens": out.tokens, "score": out.score, "finish_reason": out.finish_reason,
                              "batch_size": len(requests)}
                self.m_tokens.inc(len(out.tokens), tags={"endpoint": requests[i].get("endpoint", "")})
        return results

    def _score(self, m: LoadedModel, requests: list[dict]) -> list[dict]:
        from kilm_ray.generation import score_candidates

        # Each request is scored on its own (one encoder pass, candidates in token-budget sub-batches): its
        # scores never depend on which requests shared the batch, and memory is bounded per forward.
        budget = int(self.settings["score_token_budget"])
        return [{"scores": [list(s) for s in score_candidates(m.model, r["encoder_ids"], r["decoder_prefix"],
                                                              r["continuations"], m.sp.pad, budget)],
                 "batch_size": len(requests)} for r in requests]

    def info(self) -> dict:
        m = self.loaded
        return {"model": m.uri, "meta": m.meta, "device": self.device, "dtype": self.dtype,
                "parameters": sum(p.numel() for p in m.model.parameters()), "batching": self.stats.summary(),
                "pid": os.getpid(), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


# ----------------------------------------------------------------------------------------------
# The HTTP ingress
# ----------------------------------------------------------------------------------------------


def admission_limit(settings: dict) -> int:
    """Requests one ingress replica holds at once before answering 503: what the model replicas can run
    and queue (0 = unlimited when the model queue is)."""
    queued = int(settings["max_queued_requests"])
    if queued < 0:
        return 0
    replicas = int(settings["max_replicas"] if settings["autoscaling"] else settings["num_replicas"])
    return max(1, (int(settings["max_ongoing_requests"]) + queued) * replicas // max(1, int(settings["ingress_replicas"])))


@dataclass
class Gate:
    """What every request passes before its body is read: the bearer token, admission (so the ingress
    answers 503 in our format before Serve's own queue would), and the body limit counted on the bytes
    actually received (a chunked body has no Content-Length)."""

    max_request_bytes: int = 65536
    token: Optional[str] = None
    max_in_flight: int = 0  # 0: no limit
    in_flight: int = 0
    metrics: dict = field(default_factory=dict)

    def unauthorized(self, path: str, authorization: Optional[str]) -> bool:
        if self.token is None or path in OPEN_PATHS:
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
    """Auth, admission and the streamed body limit run here, before FastAPI reads and validates the body.
    (A route class rather than a middleware: Serve's class-based ingress keeps the routes it is given.)"""

    def get_route_handler(self):
        handler = super().get_route_handler()
        path = self.path

        async def gated(request: Request):
            gate = _gate()
            started = time.perf_counter()
            response = None
            if gate.unauthorized(path, request.headers.get("authorization")):
                response = JSONResponse(status_code=401, headers={"WWW-Authenticate": "Bearer"}, content={
                    "error": "missing or wrong bearer token (Authorization: Bearer <token>)"})
            elif gate.max_in_flight and gate.in_flight >= gate.max_in_flight:
                response = busy_response(f"the service is at capacity ({gate.in_flight} requests in flight)")
            if response is None:
                gate.in_flight += 1
                _observe(gate, "in_flight", gate.in_flight)
                try:
                    if request.method in ("POST", "PUT", "PATCH"):
                        request = _as_json_request(request, await _read_limited(request, gate.max_request_bytes))
                    response = await handler(request)
                except _TooLarge as exc:
                    response = JSONResponse(status_code=413, content={"error": str(exc)})
                except Exception as exc:  # answered by the app's exception handlers; counted and logged here
                    _record(gate, request.method, path, _status_of(exc), time.perf_counter() - started)
                    raise
                finally:
                    gate.in_flight -= 1
                    _observe(gate, "in_flight", gate.in_flight)
            _record(gate, request.method, path, response.status_code, time.perf_counter() - started)
            return response

        return gated


def _status_of(exc: Exception) -> int:
    """The status the app's exception handlers answer ``exc`` with."""
    if isinstance(exc, RequestValidationError):
        return 400 if any(e.get("type") == "json_invalid" for e in exc.errors()) else 422
    return int(getattr(exc, "status_code", 500))


def _observe(gate: Gate, name: str, value: float) -> None:
    if name in gate.metrics:
        gate.metrics[name].set(value)


def _record(gate: Gate, method: str, path: str, status: int, seconds: float) -> None:
    latency_ms = round(1000 * seconds, 2)
    if gate.metrics:
        gate.metrics["requests"].inc(tags={"endpoint": path, "status": str(status)})
        gate.metrics["latency"].observe(latency_ms, tags={"endpoint": path})
    if path not in OPEN_PATHS:
        request_log.info("%s %s %d %.1fms", method, path, status, latency_ms,
                         extra={"endpoint": path, "status_code": status, "latency_ms": latency_ms})


app = FastAPI(title="kilm_ray knowledge probes", version=API_VERSION,
              description="Probe the entity knowledge injected into BART by KILM.")
app.router.route_class = _GatedRoute


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    problems = []
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            return JSONResponse(status_code=400, content={"error": f"request body is not valid JSON: {err.get('msg')}"})
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        problems.append(f"{where}: {err.get('msg')}")
    return JSONResponse(status_code=422, content={"error": "; ".join(problems), "problems": problems})


@app.exception_handler(StarletteHTTPException)  # also FastAPI's own (e.g. "error parsing the body")
async def _http_error(request: Request, exc: StarletteHTTPException):
    if exc.status_code == 503:
        return busy_response(str(exc.detail))
    detail = exc.detail
    if exc.status_code == 400 and detail == "There was an error parsing the body":
        detail = "request body is not valid JSON (or not UTF-8 text)"
    return JSONResponse(status_code=exc.status_code, content={"error": detail}, headers=exc.headers)


INLINE_TOKENIZE_CHARS = 2048  # about 0.2 ms of tokenizing: cheaper inline than a thread hand-off


def _text_chars(req) -> int:
    """Characters of text in a request (strings and candidates' strings)."""
    total = 0
    for value in req.__dict__.values():
        if isinstance(value, str):
            total += len(value)
        elif isinstance(value, list):
            total += sum(len(c.title) + len(c.description) for c in value)
    return total


@dataclass
class IngressTokenizer:
    uri: str
    tokenizer: Any
    sp: Any
    vocab: str
    max_positions: int

    @classmethod
    def load(cls, uri: str) -> "IngressTokenizer":
        from kilm_ray import storage
        from kilm_ray.tokenizer import load_tokenizer, special_ids, tokenizer_fingerprint

        # Only the tokenizer and config: no copy of the weights per ingress replica.
        with storage.materialized(uri, skip_suffixes=storage.WEIGHT_SUFFIXES) as local:
            tokenizer = load_tokenizer(str(local))
            max_positions = int(json.loads((local / "config.json").read_text()).get("max_position_embeddings", 10**9))
        return cls(uri, tokenizer, special_ids(tokenizer), tokenizer_fingerprint(tokenizer), max_positions)


@serve.deployment(name="ProbeAPI")
@serve.ingress(app)
class ProbeAPI:
    def __init__(self, model, settings: dict):
        from ray.serve.metrics import Counter, Gauge, Histogram

        self.model = model
        self.settings = settings
        self.tok: Optional[IngressTokenizer] = None
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
        uri = str(config["model"])
        if self.tok is None or self.tok.uri != uri:
            self.tok = await asyncio.to_thread(IngressTokenizer.load, uri)

    # -- helpers ---------------------------------------------------------------------------------

    def _options(self, req) -> tuple[int, int]:
        s = self.settings
        max_new = req.max_new_tokens or int(s["default_max_new_tokens"])
        beams = req.num_beams or 1
        if max_new > int(s["max_new_tokens_limit"]):
            raise HTTPException(422, f"max_new_tokens: {max_new} is above the server limit {s['max_new_tokens_limit']}")
        if beams > int(s["max_beams"]):
            raise HTTPException(422, f"num_beams: {beams} is above the server limit {s['max_beams']}")
        return max_new, beams

    def _check_length(self, tok: IngressTokenizer, encoder_ids: list[int]) -> None:
        limit = min(int(self.settings["max_input_tokens"]), tok.max_positions)
        if len(encoder_ids) > limit:
            raise HTTPException(413, f"the input is {len(encoder_ids)} tokens; the limit is {limit}")

    @staticmethod
    def _mention(tok: IngressTokenizer, req: MentionInContext) -> tuple[str, str, str]:
        from kilm_ray.probes import control_tokens, refuse_control_tokens, split_marked_text

        if req.text is not None:
            if req.left is not None or req.mention is not None or req.right is not None:
                raise HTTPException(422, "give either 'text' with <ent>...</ent> or 'left'/'mention'/'right', not both")
            left, mention, right = split_marked_text(req.text)
            refuse_control_tokens("text", left + mention + right, control_tokens(tok.tokenizer))
            return left, mention, right
        if req.mention is None:
            raise HTTPException(422, "missing the mention: give 'text' with <ent>...</ent>, or 'mention' "
                                     "(with optional 'left' and 'right')")
        return req.left or "", req.mention, req.right or ""

    async def _prepare(self, req, work):
        """Tokenize and build the prompt; a ProbeError (bad input) becomes a 422 naming the problem. Long
        inputs are tokenized in a thread so the event loop keeps accepting requests meanwhile; short ones
        inline, where a thread hand-off costs more than the work (it cut batched throughput by a quarter)."""
        from kilm_ray.probes import ProbeError

        tok = self.tok
        try:
            if _text_chars(req) <= INLINE_TOKENIZE_CHARS:
                return tok, work(tok)
            return tok, await asyncio.to_thread(work, tok)
        except ProbeError as exc:
            raise HTTPException(422, str(exc)) from None

    def _prompt(self, tok: IngressTokenizer, build, *args):
        prompt = build(tok.tokenizer, tok.sp, *args)
        self._check_length(tok, prompt.encoder_ids)
        return prompt

    async def _call(self, method: str, payload: dict) -> dict:
        from ray.serve.exceptions import BackPressureError

        try:
            out = await getattr(self.model, method).remote(payload)
        except BackPressureError:
            raise HTTPException(503, "the model is at capacity (queue full)") from None
        if out.get("stale_vocab"):
            raise HTTPException(503, "a new model is being rolled out")
        return out

    async def _generate(self, endpoint: str, tok: IngressTokenizer, prompt, req) -> dict:
        max_new, beams = self._options(req)
        return await self._call("generate", {
            "encoder_ids": prompt.encoder_ids, "decoder_prefix": prompt.decoder_prefix, "vocab": tok.vocab,
            "stop_ids": sorted({prompt.stop_id, tok.sp.eos}), "max_new_tokens": max_new, "num_beams": beams,
            "endpoint": endpoint})

    # -- endpoints -------------------------------------------------------------------------------

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @app.get(f"/{API_VERSION}/model")
    async def model_info(self) -> dict:
        from kilm_ray.tokenizer import KILM_TOKENS

        info = await self.model.info.remote()
        s = self.settings
        return {**info, "api_version": API_VERSION, "special_tokens": KILM_TOKENS,
                "checkpoint": info["meta"].get("checkpoint"), "step": info["meta"].get("step"),
                "generation_defaults": {"max_new_tokens": s["default_max_new_tokens"], "num_beams": 1},
                "limits": {k: s[k] for k in ("max_new_tokens_limit", "max_beams", "max_input_tokens",
                                             "max_candidates", "max_candidate_tokens", "max_request_bytes",
                                             "max_batch_size")}}

    @app.post(f"/{API_VERSION}/describe", response_model=DescribeResponse)
    async def describe(self, req: DescribeRequest):
        from kilm_ray.probes import describe_prompt, parse_knowledge

        tok, prompt = await self._prepare(req, lambda t: self._prompt(t, describe_prompt, *self._mention(t, req)))
        out = await self._generate("describe", tok, prompt, req)
        title, description = parse_knowledge(tok.tokenizer, tok.sp, out["tokens"])
        return DescribeResponse(title=title, description=description, score=out["score"],
                                finish_reason=out["finish_reason"])

    @app.post(f"/{API_VERSION}/disambiguate", response_model=DisambiguateResponse)
    async def disambiguate(self, req: DisambiguateRequest):
        from kilm_ray.probes import candidate_continuation, describe_prompt

        limit = int(self.settings["max_candidates"])
        if len(req.candidates) > limit:
            raise HTTPException(422, f"candidates: {len(req.candidates)} given; the limit is {limit}")

        def prepare(t: IngressTokenizer):
            prompt = self._prompt(t, describe_prompt, *self._mention(t, req))
            # Each candidate is cut to fit: the server's cap and the positions left after the prefix.
            room = min(int(self.settings["max_candidate_tokens"]), t.max_positions - len(prompt.decoder_prefix))
            return prompt, [candidate_continuation(t.tokenizer, t.sp, c.title, c.description, room, f"candidates.{i}")
                            for i, c in enumerate(req.candidates)]

        tok, (prompt, continuations) = await self._prepare(req, prepare)
        out = await self._call("score", {"encoder_ids": prompt.encoder_ids, "decoder_prefix": prompt.decoder_prefix,
                                         "continuations": continuations, "vocab": tok.vocab})
        scored = [(lp / max(n, 1), lp, c) for (lp, n), c in zip(out["scores"], req.candidates)]
        scored.sort(key=lambda t: -t[0])
        return DisambiguateResponse(ranking=[
            RankedCandidate(title=c.title, description=c.description, score=mean, logprob=lp, rank=i + 1)
            for i, (mean, lp, c) in enumerate(scored)])

    @app.post(f"/{API_VERSION}/appositive", response_model=AppositiveResponse)
    async def appositive(self, req: AppositiveRequest):
        from kilm_ray.probes import appositive_prompt, parse_knowledge

        tok, prompt = await self._prepare(req, lambda t: self._prompt(t, appositive_prompt, req.text, req.mention))
        out = await self._generate("appositive", tok, prompt, req)
        title, description = parse_knowledge(tok.tokenizer, tok.sp, out["tokens"])
        return AppositiveResponse(appositive=description, title=title, score=out["score"],
                                  finish_reason=out["finish_reason"])

    @app.post(f"/{API_VERSION}/qa", response_model=QAResponse)
    async def qa(self, req: QARequest):
        from kilm_ray.probes import parse_text, qa_prompt

        tok, prompt = await self._prepare(req, lambda t: self._prompt(t, qa_prompt, req.question))
        out = await self._generate("qa", tok, prompt, req)
        return QAResponse(answer=parse_text(tok.tokenizer, tok.sp, out["tokens"]), score=out["score"],
                          finish_reason=out["finish_reason"])

    @app.post(f"/{API_VERSION}/fill", response_model=FillResponse)
    async def fill(self, req: FillRequest):
        from kilm_ray.probes import fill_prompt, parse_text

        tok, prompt = await self._prepare(req, lambda t: self._prompt(t, fill_prompt, req.text))
        out = await self._generate("fill", tok, prompt, req)
        return FillResponse(text=parse_text(tok.tokenizer, tok.sp, prompt.decoder_prefix[2:] + out["tokens"]),
                            score=out["score"], finish_reason=out["finish_reason"])


# ----------------------------------------------------------------------------------------------
# Building and running the application
# ----------------------------------------------------------------------------------------------


def build_application(model_uri: str, settings: dict):
    """The bound application (ingress + model) for ``serve.run``; ``settings`` = the serve config.

    The export is each deployment's ``user_config``: running this again with another ``model_uri`` under
    the same application name rolls the new export out in place (``reconfigure``), without new replicas."""
    s = settings
    user_config = {"model": str(model_uri)}
    logging_config = {"encoding": s["log_encoding"], "enable_access_log": s["access_log"]}
    # Serve also writes every replica log line to stderr, which Ray forwards to the driver: a second copy of
    # each request line, shipped and printed at the request rate. The files under logs/serve keep them all.
    quiet = {} if s["log_to_stderr"] else {"runtime_env": {"env_vars": {"RAY_SERVE_LOG_TO_STDERR": "0"}}}
    model_options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": s["num_cpus"], "num_gpus": s["num_gpus"], **quiet},
        "max_ongoing_requests": s["max_ongoing_requests"],
        "max_queued_requests": s["max_queued_requests"],
        # The ingress logs each HTTP request; a second line per internal call would cost the busiest process.
        "user_config": user_config, "logging_config": dict(logging_config, enable_access_log=False),
    }
    if s["autoscaling"]:
        model_options["autoscaling_config"] = {"min_replicas": s["min_replicas"], "max_replicas": s["max_replicas"],
                                               "target_ongoing_requests": s["target_ongoing_requests"]}
    else:
        model_options["num_replicas"] = s["num_replicas"]
    model = KilmModel.options(**model_options).bind(s)
    admission = admission_limit(s)
    ingress = ProbeAPI.options(
        ray_actor_options={"num_cpus": s["ingress_cpus"], **quiet},
        num_replicas=s["ingress_replicas"],
        # Our gate answers 503 at `admission`; Serve's own limit sits above it (room for the fast 503s) and
        # Serve never queues for the ingress, so every 503 a client sees has the same JSON body.
        max_ongoing_requests=admission + 64 if admission else max(s["max_ongoing_requests"], 2 * s["max_batch_size"]),
        max_queued_requests=-1,
        user_config=user_config, logging_config=logging_config,
    )
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


def run_service(model_uri: str, serve_settings: dict, blocking: bool = True):
    """Start Serve's HTTP proxy on host:port and deploy the application."""
    serve.start(http_options={"host": serve_settings["host"], "port": serve_settings["port"]})
    handle = serve.run(build_application(model_uri, serve_settings), name=serve_settings["app_name"],
                       route_prefix="/", blocking=False)
    url = f"http://{serve_settings['host']}:{serve_settings['port']}"
    log.info("kilm probes served at %s (POST /v1/describe, /v1/disambiguate, /v1/appositive, /v1/qa, /v1/fill)", url)
    if blocking:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.delete(serve_settings["app_name"])
    return handle, url
