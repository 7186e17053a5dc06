"""The standard text-generation protocols, translated to and from the model replica's jobs and events:
Hugging Face TGI (``POST /generate``, ``/generate_stream``, ``/``) and OpenAI completions
(``POST /v1/completions``), plus server-sent-event framing and each protocol's error body. Pure functions:
no Serve, no model; the routes (``api.py``) and the gate (``gate.py``) only call them.

The replica's events (one request)::

    {"type": "start", "prompt_tokens": n, "model": uri}
    {"type": "token", "id": t, "text": delta, "field": name, "logprob": lp, "special": bool, "top": [...] | None}
    {"type": "done", "answer": {field: text}, "tail": {field: delta}, "finish_reason": "stop" | "length",
     "stop_reason": "eos" | "stop_sequence" | "length", "generated_tokens": n, "prompt_tokens": n,
     "mean_logprob": x, "model": uri}
    {"type": "error", "status": code, "error": message}

``tail`` is text held back until the end (a partial UTF-8 character, whitespace the answer strips, a
possible beginning of a stop sequence): the deltas of a field plus its tail are the field's text.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

# ----------------------------------------------------------------------------------------------
# Server-sent events
# ----------------------------------------------------------------------------------------------

SSE_DONE = b"data: [DONE]\n\n"


def sse(data: Any, event: Optional[str] = None) -> bytes:
    """One server-sent event: an optional ``event:`` line and one ``data:`` line of compact JSON."""
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()


# ----------------------------------------------------------------------------------------------
# Error bodies, one shape per protocol
# ----------------------------------------------------------------------------------------------

PROTOCOLS = ("kilm", "tgi", "openai")
CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"  # an input over the model's or the server's token limit
# TGI's router: 422 validation, 429 overloaded, 424 generation (huggingface_hub raises ValidationError,
# OverloadedError, GenerationError from error_type). A 401 is not TGI's (it has no auth): no error_type, so the
# client raises its plain HTTP error for a 401, as for any Hugging Face endpoint that refuses a token.
TGI_ERROR_TYPES = {429: "overloaded", 424: "generation"}
OPENAI_ERROR_TYPES = {401: "authentication_error", 429: "rate_limit_error"}
_PARAM = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*): ")


def protocol_status(protocol: str, status: int, code: Optional[str] = None) -> int:
    """Our status as the protocol says it: OpenAI answers a request it cannot take (and an over-long input)
    with 400; TGI says 429 when overloaded, 424 when generation failed, 422 for an over-long input."""
    if protocol == "openai" and (status == 422 or code == CONTEXT_LENGTH_EXCEEDED):
        return 400
    if protocol == "tgi":
        if code == CONTEXT_LENGTH_EXCEEDED:
            return 422
        return {503: 429, 500: 424}.get(status, status)
    return status


def error_body(protocol: str, status: int, message: str, problems: Optional[list[str]] = None,
               retry_after_s: Optional[int] = None, code: Optional[str] = None) -> dict:
    """The body of an error answer (``status`` as ``protocol_status`` gives it) in the protocol's own shape:
    ours ``{"error", ...}``; TGI's ``{"error", "error_type"}``; OpenAI's ``{"error": {"message", "type",
    "param", "code"}}`` (``param``: the request field the message names first)."""
    if protocol == "tgi":
        if status == 401:
            return {"error": message}
        return {"error": message, "error_type": TGI_ERROR_TYPES.get(status, "validation" if status < 500 else
                                                                    "generation")}
    if protocol == "openai":
        kind = OPENAI_ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        named = _PARAM.match(message)
        return {"error": {"message": message, "type": kind, "param": named.group(1) if named else None,
                          "code": code}}
    body: dict[str, Any] = {"error": message}
    if status == 422:
        body["problems"] = problems or [message]
    if retry_after_s is not None:
        body["retry_after_s"] = retry_after_s
    return body


def stream_error(protocol: str, event: dict) -> bytes:
    """A failure in the middle of a stream, as the protocol's error event."""
    status = protocol_status(protocol, int(event["status"]), event.get("code"))
    return sse(error_body(protocol, status, event["error"], code=event.get("code")))


class ErrorBody(BaseModel):
    """Every error of the probe API (400, 401, 404, 413, 500)."""
    model_config = ConfigDict(extra="forbid")
    error: str = Field(description="what is wrong, naming the field or limit")


class ValidationErrorBody(ErrorBody):
    """422: the request is well-formed JSON that does not fit the endpoint."""
    problems: list[str] = Field(description="one line per problem ('field: message')")


class BusyErrorBody(ErrorBody):
    """503: the service is full or stopping; retry after ``retry_after_s`` (also the Retry-After header)."""
    retry_after_s: int


class TgiErrorBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    error: str
    error_type: Optional[str] = Field(None, description="validation, overloaded or generation (TGI's error types); "
                                                        "absent on a 401 (TGI has no auth)")


class OpenAIErrorDetail(BaseModel):
    model_config = ConfigDict(extra="forbid")
    message: str
    type: str
    param: Optional[str]
    code: Optional[str]


class OpenAIErrorBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    error: OpenAIErrorDetail


# ----------------------------------------------------------------------------------------------
# The probe API's own streaming (POST /v1/describe, ... with "stream": true)
# ----------------------------------------------------------------------------------------------


def probe_response(done: dict) -> dict:
    """A generating probe's JSON answer: its fields (title and description, appositive, answer or text),
    the mean log-probability of the generated tokens and the finish reason."""
    return {**done["answer"], "mean_logprob": done["mean_logprob"], "finish_reason": done["finish_reason"]}


def probe_frames(event: dict) -> list[bytes]:
    """The server-sent events of one replica event: ``delta`` ``{field: text}`` as text comes, ``done``
    with the whole answer (the same object as without streaming), or ``error`` ``{"error"}``."""
    kind = event["type"]
    if kind == "token":
        return [sse({event["field"]: event["text"]}, "delta")] if event["text"] else []
    if kind == "done":
        tail = [sse({field: text}, "delta") for field, text in event["tail"].items() if text]
        return tail + [sse(probe_response(event), "done")]
    if kind == "error":
        return [sse({"error": event["error"]}, "error")]
    return []


# ----------------------------------------------------------------------------------------------
# Shared: options every protocol refuses by name
# ----------------------------------------------------------------------------------------------

GREEDY_ONLY = "this service decodes greedily (no sampling); leave it out"


def _refused(values: dict[str, Any], neutral: dict[str, Any], prefix: str = "") -> list[str]:
    """``field: not supported`` for each option set to anything but its neutral value."""
    problems = []
    for name, value in values.items():
        if value is not None and (name not in neutral or value != neutral[name]):
            ok = f" (only {neutral[name]!r})" if name in neutral else ""
            problems.append(f"{prefix}{name}: not supported{ok}; {GREEDY_ONLY}")
    return problems


MAX_STOPS = 4
MAX_STOP_CHARS = 64  # serve.max_stop_chars' default


def stop_list(stop: Union[None, str, list[str]], field: str, limit: int = MAX_STOPS,
              max_chars: int = MAX_STOP_CHARS) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > limit:
        raise ValueError(f"{field}: {len(stops)} stop sequences; the limit is {limit}")
    if any(not s for s in stops):
        raise ValueError(f"{field}: a stop sequence is empty")
    longest = max((len(s) for s in stops), default=0)
    if longest > max_chars:
        raise ValueError(f"{field}: a stop sequence of {longest} characters; the limit is {max_chars}")
    return stops


def held_suffix(text: str, stop: str) -> int:
    """Length of the longest proper suffix of ``text`` that begins ``stop`` (0: none). Only positions where
    ``stop``'s first character occurs are tried (found in C by ``str.find``), over the last len(stop)-1
    characters: O(len(stop)) per call however long ``text`` grew."""
    first, at = stop[0], max(0, len(text) - len(stop) + 1)
    while True:
        at = text.find(first, at)
        if at < 0:
            return 0
        if stop.startswith(text[at:]):
            return len(text) - at
        at += 1


class StopMatcher:
    """Stop sequences on streamed text: ``feed`` returns the text that is safe to send (a suffix that could
    begin a stop sequence is held back) and the stop sequence once one appears; the text before it is
    the answer (OpenAI leaves the sequence out; TGI adds it back).

    Cost per fed token: what is held back is shorter than the longest stop, so each feed searches at most
    len(delta) + len(stop) characters per stop (a 4 x 15,000-character stop list once cost ~18 ms a token;
    stops are now capped at serve.max_stop_chars as well)."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.matched: Optional[str] = None

    def feed(self, delta: str) -> str:
        if self.matched is not None:
            return ""
        if not self.stops:
            return delta
        self.pending += delta
        found = [(at, s) for s in self.stops if (at := self.pending.find(s)) >= 0]
        if found:
            at, stop = min(found)
            self.matched = stop
            out, self.pending = self.pending[:at], ""
            return out
        hold = max(held_suffix(self.pending, s) for s in self.stops)
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out

    def flush(self) -> str:
        """What is still held back once generation ended without a match."""
        out, self.pending = ("", "") if self.matched is not None else (self.pending, "")
        return out


# ----------------------------------------------------------------------------------------------
# TGI: POST /generate, /generate_stream and / (stream in the body)
# ----------------------------------------------------------------------------------------------


class TgiParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_new_tokens: Optional[int] = Field(None, ge=1, description="tokens to generate (server limit applies)")
    details: bool = Field(False, description="add finish reason, tokens and their log-probabilities")
    return_full_text: bool = Field(False, description="prepend the input to generated_text")
    stop: list[str] = Field(default_factory=list, description="stop sequences (at most 4)")
    top_n_tokens: Optional[int] = Field(None, ge=0, le=5, description="most likely alternatives per token")
    seed: Optional[int] = Field(None, description="accepted and echoed (decoding is greedy: no randomness)")
    do_sample: Optional[bool] = None
    decoder_input_details: Optional[bool] = None
    best_of: Optional[int] = None
    temperature: Optional[float] = None
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    typical_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    truncate: Optional[int] = None
    watermark: Optional[bool] = None
    grammar: Optional[dict] = None
    adapter_id: Optional[str] = None


class TgiRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inputs: str = Field(description="the prompt: text to continue, text with <mask>, or a mention marked "
                                    "<ent>...</ent> (its knowledge comes back as Title<sep>description)")
    parameters: TgiParameters = Field(default_factory=TgiParameters)
    stream: bool = False


TGI_NEUTRAL = {"do_sample": False, "decoder_input_details": False, "best_of": 1, "watermark": False}


def _stops_or_refuse(stop, field: str, problems: list[str], max_chars: int) -> list[str]:
    """The request's stop strings; ValueError naming every problem found so far (and the stop's own)."""
    stops: list[str] = []
    try:
        stops = stop_list(stop, field, max_chars=max_chars)
    except ValueError as exc:
        problems.append(str(exc))
    if problems:
        raise ValueError("; ".join(problems))
    return stops


def tgi_job(req: TgiRequest, default_max_new_tokens: int, max_stop_chars: int = MAX_STOP_CHARS) -> dict:
    """The replica job of a TGI request; ValueError lists every unsupported or wrong parameter."""
    p = req.parameters
    problems = _refused({k: getattr(p, k) for k in ("do_sample", "decoder_input_details", "best_of", "temperature",
                                                     "top_k", "top_p", "typical_p", "repetition_penalty",
                                                     "frequency_penalty", "truncate", "watermark", "grammar",
                                                     "adapter_id")}, TGI_NEUTRAL, "parameters.")
    stops = _stops_or_refuse(p.stop, "parameters.stop", problems, max_stop_chars)
    return {"task": "complete", "fields": {"prompt": req.inputs}, "stop": stops,
            "max_new_tokens": p.max_new_tokens or default_max_new_tokens, "num_beams": 1,
            "top_n": p.top_n_tokens or 0}


TGI_FINISH = {"eos": "eos_token", "stop_sequence": "stop_sequence", "length": "length"}


def _tgi_token(event: dict) -> dict:
    """A token as TGI gives it: its own text (not held back for a possible stop sequence)."""
    return {"id": event["id"], "text": event.get("raw", event["text"]), "logprob": event["logprob"],
            "special": event["special"]}


def tgi_last_text(streamed: str, last: dict, done: dict, stop: Optional[str]) -> str:
    """The last streamed token's text: what completes the generated text, so that the streamed texts join to
    exactly ``generated_text`` (a stop sequence included, nothing generated after it)."""
    text = done["answer"]["text"] + (stop or "")
    return text[len(streamed):] if text.startswith(streamed) else last.get("raw", last["text"])


def _tgi_top(event: dict) -> list[dict]:
    return [{"id": t["id"], "text": t["text"], "logprob": t["logprob"], "special": t["special"]}
            for t in event.get("top") or []]


def tgi_generated_text(req: TgiRequest, done: dict, stop: Optional[str]) -> str:
    text = done["answer"]["text"] + (stop or "")  # TGI's text ends with the stop sequence that ended it
    return req.inputs + text if req.parameters.return_full_text else text


def tgi_response(req: TgiRequest, tokens: list[dict], done: dict, stop: Optional[str]) -> dict:
    """The body of ``POST /generate``: ``{generated_text, details}`` (details when asked)."""
    body: dict[str, Any] = {"generated_text": tgi_generated_text(req, done, stop)}
    if req.parameters.details:
        body["details"] = {"finish_reason": TGI_FINISH[done["stop_reason"]], "generated_tokens": len(tokens),
                           "seed": req.parameters.seed, "prefill": [], "tokens": [_tgi_token(t) for t in tokens]}
        if req.parameters.top_n_tokens:
            body["details"]["top_tokens"] = [_tgi_top(t) for t in tokens]
    return body


def tgi_stream_event(req: TgiRequest, index: int, token: dict, done: Optional[dict] = None,
                     stop: Optional[str] = None) -> dict:
    """One event of ``/generate_stream``: a token; the last one also carries generated_text and details."""
    event: dict[str, Any] = {"index": index, "token": _tgi_token(token), "generated_text": None, "details": None}
    if req.parameters.top_n_tokens:
        event["top_tokens"] = _tgi_top(token)
    if done is not None:
        event["generated_text"] = tgi_generated_text(req, done, stop)
        event["details"] = {"finish_reason": TGI_FINISH[done["stop_reason"]], "generated_tokens": index,
                            "input_length": done["prompt_tokens"], "seed": req.parameters.seed}
    return event


# ----------------------------------------------------------------------------------------------
# OpenAI: POST /v1/completions
# ----------------------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="the served model's id (GET /v1/models)")
    prompt: Union[str, list[str]] = Field(description="a prompt or a list of prompts (one choice each); as "
                                                      "TGI's inputs: text, text with <mask>, or a marked mention")
    max_tokens: Optional[int] = Field(16, ge=1, description="tokens to generate per prompt (server limit applies)")
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    logprobs: Optional[int] = Field(None, ge=0, le=5, description="log-probabilities of the chosen tokens and "
                                                                   "this many most likely alternatives")
    stop: Union[None, str, list[str]] = Field(None, description="up to 4 stop sequences (left out of the text)")
    n: Optional[int] = None
    best_of: Optional[int] = None
    echo: Optional[bool] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict] = None
    suffix: Optional[str] = None
    seed: Optional[int] = Field(None, description="accepted (decoding is greedy: no randomness)")
    user: Optional[str] = None


OPENAI_NEUTRAL = {"n": 1, "best_of": 1, "echo": False, "temperature": 0.0, "top_p": 1.0, "presence_penalty": 0.0,
                  "frequency_penalty": 0.0, "logit_bias": {}, "suffix": ""}


def openai_jobs(req: CompletionRequest, max_prompts: int, max_stop_chars: int = MAX_STOP_CHARS) -> list[dict]:
    """One replica job per prompt; ValueError lists every unsupported or wrong option."""
    problems = _refused({k: getattr(req, k) for k in OPENAI_NEUTRAL}, OPENAI_NEUTRAL)
    if req.stream_options is not None and not req.stream:
        problems.append("stream_options: only allowed when stream is true")
    prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
    if not prompts:
        problems.append("prompt: the list is empty")
    if len(prompts) > max_prompts:
        problems.append(f"prompt: {len(prompts)} prompts; the limit is {max_prompts}")
    stops = _stops_or_refuse(req.stop, "stop", problems, max_stop_chars)
    return [{"task": "complete", "fields": {"prompt": p}, "stop": stops, "max_new_tokens": req.max_tokens or 16,
             "num_beams": 1, "top_n": req.logprobs or 0} for p in prompts]


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def _top_by_text(top: list[dict]) -> dict[str, float]:
    """OpenAI's top_logprobs is keyed by text: two tokens with the same text keep the likelier one (the
    list is most likely first; a plain dict comprehension kept the last, the least likely)."""
    out: dict[str, float] = {}
    for alt in top:
        out.setdefault(alt["text"], alt["logprob"])
    return out


def _openai_logprobs(tokens: list[dict], offset: int) -> dict:
    text_offset, at = [], offset
    for t in tokens:
        text_offset.append(at)
        at += len(t["text"])
    return {"tokens": [t["text"] for t in tokens], "token_logprobs": [t["logprob"] for t in tokens],
            "top_logprobs": [_top_by_text(t.get("top") or []) for t in tokens],
            "text_offset": text_offset}


def openai_visible(tokens: list[dict]) -> list[dict]:
    """The tokens a completion shows: the stop token that ended it is not part of the text."""
    return [t for t in tokens if not t.get("stop")]


def openai_choice(index: int, tokens: list[dict], done: dict, logprobs: Optional[int]) -> dict:
    return {"index": index, "text": done["answer"]["text"], "finish_reason": done["finish_reason"],
            "logprobs": _openai_logprobs(openai_visible(tokens), 0) if logprobs is not None else None}


def openai_usage(dones: list[dict]) -> dict:
    prompt = sum(d["prompt_tokens"] for d in dones)
    completion = sum(d["generated_tokens"] for d in dones)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def openai_completion(cid: str, model: str, choices: list[dict], dones: list[dict],
                      created: Optional[int] = None) -> dict:
    """The body of ``POST /v1/completions`` (``object: text_completion``)."""
    return {"id": cid, "object": "text_completion", "created": created or int(time.time()), "model": model,
            "choices": choices, "usage": openai_usage(dones)}


def openai_chunk(cid: str, model: str, created: int, index: int, text: str, finish_reason: Optional[str] = None,
                 tokens: Optional[list[dict]] = None, offset: int = 0, with_usage: bool = False) -> dict:
    """One streamed chunk: the same object with one choice holding a text delta (and ``"usage": null`` when
    the request asked for usage: OpenAI sends it on every chunk, filled in on the last one only)."""
    choice = {"index": index, "text": text, "finish_reason": finish_reason,
              "logprobs": _openai_logprobs(tokens, offset) if tokens is not None else None}
    chunk = {"id": cid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}
    if with_usage:
        chunk["usage"] = None
    return chunk


def openai_model(model: str, created: int) -> dict:
    return {"id": model, "object": "model", "created": created, "owned_by": "kilm_ray"}


def openai_models(model: str, created: int) -> dict:
    return {"object": "list", "data": [openai_model(model, created)]}


CHAT_REFUSED = ("chat completions are not served: this is a BART knowledge-infilling model, not a chat model; "
                "POST /v1/completions with a prompt (text to continue, text with <mask>, or a mention marked "
                "<ent>...</ent> for its knowledge), or the probe API (/v1/describe, ...; docs/serving.md)")


# ----------------------------------------------------------------------------------------------
# TGI's informational routes
# ----------------------------------------------------------------------------------------------


def tgi_info(model_id: str, settings: dict, device: str, dtype: str, version: str, max_concurrent: int) -> dict:
    """``GET /info`` as TGI's router answers it (the fields its clients and routers read)."""
    return {"model_id": model_id, "model_sha": None, "model_dtype": dtype, "model_device_type": device,
            "model_pipeline_tag": "text2text-generation", "max_concurrent_requests": max_concurrent,
            "max_best_of": 1, "max_stop_sequences": MAX_STOPS, "max_input_tokens": int(settings["max_input_tokens"]),
            "max_input_length": int(settings["max_input_tokens"]),  # its name before TGI 2.1
            "max_total_tokens": int(settings["max_input_tokens"]) + int(settings["max_new_tokens_limit"]),
            "validation_workers": 1, "max_client_batch_size": 1, "router": "kilm_ray", "version": version,
            "sha": None, "docker_label": None}


METRICS_REFUSED = ("metrics are not on the service port: they are on Ray's Prometheus endpoint of every node "
                   "(ray start --metrics-export-port): ray_kilm_http_requests_total, ray_kilm_http_request_latency_ms, "
                   "ray_kilm_model_batch_size, ... (docs/serving.md, Operating it)")


Protocol = Literal["kilm", "tgi", "openai"]
