"""The Ray Serve application: a FastAPI ingress that validates requests and builds prompts, and a
model deployment that answers them in dynamic batches (``@serve.batch``).

    ProbeAPI (FastAPI, CPU)  --handle-->  KilmModel (batched generate / score, CPU or GPU)

Prompts and parsing come from ``kilm_ray.probes``, generation and scoring from
``kilm_ray.generation``: the evaluation harness uses the same functions.
"""

# No "from __future__ import annotations": FastAPI must see real types on the ingress methods.

import hmac
import json
import logging
import os
import time
from collections import defaultdict
from typing import Any, Optional

from fastapi import FastAPI, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from ray import serve

from kilm_ray.serve.schemas import (
    AppositiveRequest, AppositiveResponse, DescribeRequest, DescribeResponse, DisambiguateRequest,
    DisambiguateResponse, FillRequest, FillResponse, MentionInContext, QARequest, QAResponse, RankedCandidate,
)

log = logging.getLogger("kilm_ray.serve")
API_VERSION = "v1"


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


@serve.deployment(name="KilmModel")
class KilmModel:
    """Holds one copy of the exported model; ``generate`` and ``score`` are batched across requests."""

    def __init__(self, model_uri: str, settings: dict):
        import torch

        from kilm_ray import storage
        from kilm_ray.generation import default_device
        from kilm_ray.model import load_export
        from kilm_ray.tokenizer import special_ids

        device = default_device(settings.get("device", "auto"))
        dtype = settings.get("dtype", "auto")
        if dtype == "auto":
            dtype = "bf16" if device == "cuda" else "fp32"
        local = storage.local_copy(model_uri)
        self.model, self.tokenizer, self.meta = load_export(local, device=device, dtype=dtype)
        self.sp = special_ids(self.tokenizer)
        self.model_uri, self.device, self.dtype = model_uri, device, dtype
        self.stats = BatchStats()
        torch.set_grad_enabled(False)
        for handler in (self.generate_batch, self.score_batch):
            handler.set_max_batch_size(int(settings["max_batch_size"]))
            handler.set_batch_wait_timeout_s(float(settings["batch_wait_timeout_s"]))

    async def generate(self, request: dict) -> dict:
        return await self.generate_batch(request)

    async def score(self, request: dict) -> dict:
        return await self.score_batch(request)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def generate_batch(self, requests: list[dict]) -> list[dict]:
        self.stats.record(len(requests))
        # The model runs on this (user-code) event loop, not in a worker thread: Serve keeps health checks
        # on its own loop, requests queue up while a batch runs, and the next batch takes them all. A thread
        # here fought the loop for the GIL and starved batching (mean batch 1.3 vs 14, bench/serve_load.py).
        return self._generate(requests)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def score_batch(self, requests: list[dict]) -> list[dict]:
        self.stats.record(len(requests))
        return self._score(requests)

    def _generate(self, requests: list[dict]) -> list[dict]:
        from kilm_ray.generation import generate

        results: list[Optional[dict]] = [None] * len(requests)
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, r in enumerate(requests):
            groups[(r["num_beams"], tuple(r["stop_ids"]))].append(i)
        for (beams, stops), index in groups.items():
            longest = max(requests[i]["max_new_tokens"] for i in index)
            outs = generate(self.model, [requests[i]["encoder_ids"] for i in index],
                            [requests[i]["decoder_prefix"] for i in index], self.sp.pad, self.sp.eos, list(stops),
                            longest, beams)
            for i, out in zip(index, outs):
                out = out.truncated(requests[i]["max_new_tokens"])  # greedy is prefix-consistent
                results[i] = {"tokens": out.tokens, "score": out.score, "batch_size": len(requests)}
        return results

    def _score(self, requests: list[dict]) -> list[dict]:
        from kilm_ray.generation import score_continuations

        items, owner = [], []
        for i, r in enumerate(requests):
            for cont in r["continuations"]:
                items.append((r["encoder_ids"], r["decoder_prefix"], cont))
                owner.append(i)
        scored = score_continuations(self.model, items, self.sp.pad)
        results: list[dict] = [{"scores": [], "batch_size": len(requests)} for _ in requests]
        for i, (logprob, n) in zip(owner, scored):
            results[i]["scores"].append([logprob, n])
        return results

    def info(self) -> dict:
        return {"model": self.model_uri, "meta": self.meta, "device": self.device, "dtype": self.dtype,
                "parameters": sum(p.numel() for p in self.model.parameters()), "batching": self.stats.summary()}


# ----------------------------------------------------------------------------------------------
# The HTTP ingress
# ----------------------------------------------------------------------------------------------

_LIMITS: dict[str, Any] = {"max_request_bytes": 65536}


class _SizeLimitedRoute(APIRoute):
    """Refuses an oversized body (413) before it is read and parsed. (A route class rather than a
    middleware: Serve's class-based ingress keeps the routes it is given.)"""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def limited(request: Request):
            length = request.headers.get("content-length")
            limit = _LIMITS["max_request_bytes"]
            if length is not None and length.isdigit() and int(length) > limit:
                return JSONResponse(status_code=413, content={
                    "error": f"request body is {length} bytes; the limit is {limit}"})
            return await handler(request)

        return limited


app = FastAPI(title="kilm_ray knowledge probes", version=API_VERSION,
              description="Probe the entity knowledge injected into BART by KILM.")
app.router.route_class = _SizeLimitedRoute


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    problems = []
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            return JSONResponse(status_code=400, content={"error": f"request body is not valid JSON: {err.get('msg')}"})
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        problems.append(f"{where}: {err.get('msg')}")
    return JSONResponse(status_code=422, content={"error": "; ".join(problems), "problems": problems})


@app.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException):
    return JSONResponse(status_code=exc.status_code, content={"error": exc.detail}, headers=exc.headers)


class _Busy(Exception):
    pass


@serve.deployment(name="ProbeAPI")
@serve.ingress(app)
class ProbeAPI:
    def __init__(self, model, model_uri: str, settings: dict):
        from kilm_ray import storage
        from kilm_ray.tokenizer import load_tokenizer, special_ids

        self.model = model
        self.settings = settings
        self.token = settings.get("auth_token") or os.environ.get("KILM_SERVE_TOKEN") or None
        # Serve ships this class by value: reach the real module's table that the route class reads.
        import kilm_ray.serve.app as this_module

        this_module._LIMITS["max_request_bytes"] = int(settings["max_request_bytes"])
        local = storage.local_copy(model_uri) if storage.is_remote(model_uri) else model_uri
        self.tokenizer = load_tokenizer(str(local))
        self.sp = special_ids(self.tokenizer)
        self.model_uri = model_uri
        with open(os.path.join(str(local), "config.json")) as f:
            self.max_positions = int(json.load(f).get("max_position_embeddings", 10**9))

    # -- helpers ---------------------------------------------------------------------------------

    def _authorize(self, authorization: Optional[str]) -> None:
        if self.token is None:
            return
        expected = f"Bearer {self.token}"
        if not authorization or not hmac.compare_digest(authorization.encode(), expected.encode()):
            raise HTTPException(401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                                headers={"WWW-Authenticate": "Bearer"})

    def _options(self, req) -> tuple[int, int]:
        s = self.settings
        max_new = req.max_new_tokens or int(s["default_max_new_tokens"])
        beams = req.num_beams or 1
        if max_new > int(s["max_new_tokens_limit"]):
            raise HTTPException(422, f"max_new_tokens: {max_new} is above the server limit {s['max_new_tokens_limit']}")
        if beams > int(s["max_beams"]):
            raise HTTPException(422, f"num_beams: {beams} is above the server limit {s['max_beams']}")
        return max_new, beams

    def _check_length(self, encoder_ids: list[int]) -> None:
        limit = min(int(self.settings["max_input_tokens"]), self.max_positions)
        if len(encoder_ids) > limit:
            raise HTTPException(413, f"the input is {len(encoder_ids)} tokens; the limit is {limit}")

    def _mention(self, req: MentionInContext) -> tuple[str, str, str]:
        from kilm_ray.probes import ProbeError, split_marked_text

        if req.text is not None:
            if req.left is not None or req.mention is not None or req.right is not None:
                raise HTTPException(422, "give either 'text' with <ent>...</ent> or 'left'/'mention'/'right', not both")
            try:
                return split_marked_text(req.text)
            except ProbeError as exc:
                raise HTTPException(422, str(exc)) from None
        if req.mention is None:
            raise HTTPException(422, "missing the mention: give 'text' with <ent>...</ent>, or 'mention' "
                                     "(with optional 'left' and 'right')")
        return req.left or "", req.mention, req.right or ""

    def _prompt(self, build, *args):
        from kilm_ray.probes import ProbeError

        try:
            prompt = build(self.tokenizer, self.sp, *args)
        except ProbeError as exc:
            raise HTTPException(422, str(exc)) from None
        self._check_length(prompt.encoder_ids)
        return prompt

    async def _call(self, method: str, payload: dict) -> dict:
        from ray.serve.exceptions import BackPressureError

        try:
            return await getattr(self.model, method).remote(payload)
        except BackPressureError:
            raise HTTPException(503, "the model is at capacity (queue full); retry later",
                                headers={"Retry-After": "1"}) from None

    async def _generate(self, prompt, req) -> dict:
        max_new, beams = self._options(req)
        return await self._call("generate", {
            "encoder_ids": prompt.encoder_ids, "decoder_prefix": prompt.decoder_prefix,
            "stop_ids": sorted({prompt.stop_id, self.sp.eos}), "max_new_tokens": max_new, "num_beams": beams})

    # -- endpoints -------------------------------------------------------------------------------

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @app.get(f"/{API_VERSION}/model")
    async def model_info(self, authorization: Optional[str] = Header(None)) -> dict:
        from kilm_ray.tokenizer import KILM_TOKENS

        self._authorize(authorization)
        info = await self.model.info.remote()
        s = self.settings
        return {**info, "api_version": API_VERSION, "special_tokens": KILM_TOKENS,
                "checkpoint": info["meta"].get("checkpoint"), "step": info["meta"].get("step"),
                "generation_defaults": {"max_new_tokens": s["default_max_new_tokens"], "num_beams": 1},
                "limits": {k: s[k] for k in ("max_new_tokens_limit", "max_beams", "max_input_tokens",
                                             "max_candidates", "max_request_bytes", "max_batch_size")}}

    @app.post(f"/{API_VERSION}/describe", response_model=DescribeResponse)
    async def describe(self, req: DescribeRequest, authorization: Optional[str] = Header(None)):
        from kilm_ray.probes import describe_prompt, parse_knowledge

        self._authorize(authorization)
        prompt = self._prompt(describe_prompt, *self._mention(req))
        out = await self._generate(prompt, req)
        title, description = parse_knowledge(self.tokenizer, self.sp, out["tokens"])
        return DescribeResponse(title=title, description=description, score=out["score"])

    @app.post(f"/{API_VERSION}/disambiguate", response_model=DisambiguateResponse)
    async def disambiguate(self, req: DisambiguateRequest, authorization: Optional[str] = Header(None)):
        from kilm_ray.chunking import knowledge_ids
        from kilm_ray.probes import describe_prompt

        self._authorize(authorization)
        limit = int(self.settings["max_candidates"])
        if len(req.candidates) > limit:
            raise HTTPException(422, f"candidates: {len(req.candidates)} given; the limit is {limit}")
        prompt = self._prompt(describe_prompt, *self._mention(req))

        def encode(text: str):
            return self.tokenizer(text, add_special_tokens=False)["input_ids"], None

        continuations = [knowledge_ids(encode, c.title, c.description, self.sp.sep, 10**6) + [self.sp.desc_end]
                         for c in req.candidates]
        out = await self._call("score", {"encoder_ids": prompt.encoder_ids, "decoder_prefix": prompt.decoder_prefix,
                                         "continuations": continuations})
        scored = [(lp / max(n, 1), lp, c) for (lp, n), c in zip(out["scores"], req.candidates)]
        scored.sort(key=lambda t: -t[0])
        return DisambiguateResponse(ranking=[
            RankedCandidate(title=c.title, description=c.description, score=mean, logprob=lp, rank=i + 1)
            for i, (mean, lp, c) in enumerate(scored)])

    @app.post(f"/{API_VERSION}/appositive", response_model=AppositiveResponse)
    async def appositive(self, req: AppositiveRequest, authorization: Optional[str] = Header(None)):
        from kilm_ray.probes import appositive_prompt, parse_knowledge

        self._authorize(authorization)
        prompt = self._prompt(appositive_prompt, req.text, req.mention)
        out = await self._generate(prompt, req)
        title, description = parse_knowledge(self.tokenizer, self.sp, out["tokens"])
        return AppositiveResponse(appositive=description, title=title, score=out["score"])

    @app.post(f"/{API_VERSION}/qa", response_model=QAResponse)
    async def qa(self, req: QARequest, authorization: Optional[str] = Header(None)):
        from kilm_ray.probes import parse_text, qa_prompt

        self._authorize(authorization)
        prompt = self._prompt(qa_prompt, req.question)
        out = await self._generate(prompt, req)
        return QAResponse(answer=parse_text(self.tokenizer, self.sp, out["tokens"]), score=out["score"])

    @app.post(f"/{API_VERSION}/fill", response_model=FillResponse)
    async def fill(self, req: FillRequest, authorization: Optional[str] = Header(None)):
        from kilm_ray.probes import fill_prompt, parse_text

        self._authorize(authorization)
        prompt = self._prompt(fill_prompt, req.text)
        out = await self._generate(prompt, req)
        return FillResponse(text=parse_text(self.tokenizer, self.sp, prompt.decoder_prefix[2:] + out["tokens"]),
                            score=out["score"])


# ----------------------------------------------------------------------------------------------
# Building and running the application
# ----------------------------------------------------------------------------------------------


def build_application(model_uri: str, settings: dict):
    """The bound application (ingress + model) for ``serve.run``; ``settings`` = the serve config."""
    s = settings
    model_options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": s["num_cpus"], "num_gpus": s["num_gpus"]},
        "max_ongoing_requests": s["max_ongoing_requests"],
        "max_queued_requests": s["max_queued_requests"],
    }
    if s["autoscaling"]:
        model_options["autoscaling_config"] = {"min_replicas": s["min_replicas"], "max_replicas": s["max_replicas"],
                                               "target_ongoing_requests": s["target_ongoing_requests"]}
    else:
        model_options["num_replicas"] = s["num_replicas"]
    model = KilmModel.options(**model_options).bind(model_uri, s)
    ingress = ProbeAPI.options(
        ray_actor_options={"num_cpus": 0.1},
        max_ongoing_requests=max(s["max_ongoing_requests"], 2 * s["max_batch_size"]),
        max_queued_requests=s["max_queued_requests"],
    )
    return ingress.bind(model, model_uri, s)


def app_builder(args: dict):
    """``serve run kilm_ray.serve.app:app_builder model=DIR [config=YAML] [serve.port=...]`` and Serve
    config files (``import_path: kilm_ray.serve.app:app_builder``)."""
    from kilm_ray.config import load_config

    args = dict(args)
    model = args.pop("model", None)
    if not model:
        raise ValueError("app_builder needs model=<export directory or s3:// URI>")
    config = args.pop("config", None)
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
