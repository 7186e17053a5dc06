"""The model deployment: one replica holds one export (weights and its own tokenizer), builds each
request's prompt, runs requests in dynamic batches (``@serve.batch``) and streams their answers.

A request is tokenized by the replica that answers it, with the model that answers it: each batch row
carries its own ``LoadedModel``, so a rollout (``reconfigure`` swapping the export between two requests)
can never run one export's ids on another (rows of two exports in one batch run as two groups). There is
no tokenizer anywhere else: the HTTP ingress only checks, translates and streams.

Events of one request (``stream``; ``answer`` collects them): ``start``, a ``token`` per generated token
(its id, log-probability, text delta, answer field), then ``done`` with the whole answer, or ``error``
with an HTTP status (a ProbeError is 422, an input over the limits 413). Shapes: ``protocols.py``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional

from ray import serve

log = logging.getLogger("kilm_ray.serve")


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


@dataclass(eq=False)
class LoadedModel:
    uri: str
    model: Any
    tokenizer: Any
    sp: Any
    meta: dict
    max_positions: int
    special: frozenset

    @classmethod
    def load(cls, uri: str, device: str, dtype: str) -> "LoadedModel":
        from kilm_ray import storage
        from kilm_ray.model.bart import load_export
        from kilm_ray.method.tokenizer import special_ids

        with storage.materialized(uri) as local:  # a download is removed once the weights are in memory
            model, tokenizer, meta = load_export(local, device=device, dtype=dtype)
        return cls(uri, model, tokenizer, special_ids(tokenizer), meta, int(model.config.max_position_embeddings),
                   frozenset(tokenizer.all_special_ids))


@dataclass(eq=False)
class Row:
    """One request in a generation batch, with the model that tokenized it."""
    loaded: LoadedModel
    prompt: Any
    stop_ids: tuple[int, ...]
    max_new_tokens: int
    num_beams: int
    top_n: int = 0
    cancelled: bool = False  # set when its client left or a stop sequence matched: the batch drops it
    no_repeat_ngram_size: int = 0  # serve.no_repeat_ngram_size for knowledge answers; 0 for fill and completions


# Tasks whose answer is new text (knowledge, an answer): a repeated n-gram there is a decoding loop. /v1/fill
# rebuilds the input text and completions continue the user's, where repeats are the text's own.
NO_REPEAT_TASKS = ("describe", "appositive", "qa")


class InputTooLong(ValueError):
    pass


def _error(status: int, message: str, code: Optional[str] = None) -> dict:
    return {"type": "error", "status": status, "error": message, "code": code}


def _refused_input(exc: Exception) -> dict:
    """A request whose input the replica refuses: too long for the model or the server (413, OpenAI's
    context_length_exceeded), or not a prompt the probe can build (422)."""
    if isinstance(exc, InputTooLong):
        return _error(413, str(exc), "context_length_exceeded")
    return _error(422, str(exc))


def _failure(exc: BaseException, rows: int) -> dict:
    """A batch that failed: out of memory is a 503 (retry later), anything else a 500 whose details go to the
    log under an id the client gets (exception text can hold paths and URIs of the deployment)."""
    import torch

    from kilm_ray.serve.gate import logged_under_an_id

    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
        return _error(503, f"the model ran out of memory on a batch of {rows} requests; retry later")
    return _error(500, logged_under_an_id(f"the model failed on a batch of {rows} requests", exc))


@serve.deployment(name="KilmModel")
class KilmModel:
    """Holds one copy of the exported model; generation and scoring are batched across requests."""

    def __init__(self, settings: dict):
        import torch
        from ray.serve.metrics import Counter, Gauge, Histogram

        from kilm_ray.model.generation import default_device

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
        then swapped in. Requests already tokenized finish on the export that tokenized them."""
        uri = str(config["model"])
        if self.loaded is not None and self.loaded.uri == uri:
            return
        self.loaded = await asyncio.to_thread(LoadedModel.load, uri, self.device, self.dtype)
        log.info("model replica now serves %s", uri)

    # -- preparing a request (the replica's own tokenizer) ------------------------------------------

    def _check_length(self, m: LoadedModel, prompt) -> None:
        limit = min(int(self.settings["max_input_tokens"]), m.max_positions)
        if len(prompt.encoder_ids) > limit:
            raise InputTooLong(f"the input is {len(prompt.encoder_ids)} tokens; the limit is {limit}")

    def _row(self, m: LoadedModel, job: dict) -> Row:
        from kilm_ray.method.probes import build_prompt

        prompt = build_prompt(m.tokenizer, m.sp, job["task"], job["fields"])
        self._check_length(m, prompt)
        no_repeat = int(self.settings.get("no_repeat_ngram_size", 0)) if job["task"] in NO_REPEAT_TASKS else 0
        return Row(m, prompt, tuple(sorted({prompt.stop_id, m.sp.eos})), int(job["max_new_tokens"]),
                   int(job.get("num_beams", 1)), int(job.get("top_n", 0)), no_repeat_ngram_size=no_repeat)

    async def check(self, jobs: list[dict]) -> Optional[dict]:
        """Every job tokenized and checked against the limits, none generated: the first one's error event,
        or None. An OpenAI prompt list is checked so before any of its prompts starts, so a list with one
        refused prompt costs no generation (opening them all and cancelling cost 7 generations a request)."""
        from kilm_ray.method.probes import ProbeError

        m = self.loaded
        for job in jobs:
            try:
                self._row(m, job)
            except (ProbeError, InputTooLong) as exc:
                return _refused_input(exc)
        return None

    # -- the request's events ---------------------------------------------------------------------

    async def stream(self, job: dict) -> AsyncIterator[dict]:
        """The events of one generating request (streamed to the ingress)."""
        async for event in self._events(job):
            yield event

    async def answer(self, job: dict) -> dict:
        """One generating request, whole: ``{"tokens": [token events], "done": done event}`` or an error."""
        tokens = []
        async for event in self._events(job):
            if event["type"] == "token":
                tokens.append(event)
            elif event["type"] in ("done", "error"):
                return {"tokens": tokens, **({"done": event} if event["type"] == "done" else event)}
        return _error(500, "the answer ended without a result")

    async def _events(self, job: dict) -> AsyncIterator[dict]:
        from kilm_ray.method.probes import AnswerStream, ProbeError
        from kilm_ray.serve.protocols import StopMatcher

        m = self.loaded  # this request's model, whatever a rollout swaps in meanwhile
        try:
            row = self._row(m, job)
        except (ProbeError, InputTooLong) as exc:
            yield _refused_input(exc)
            return
        task = job["task"]
        answer = AnswerStream(m.tokenizer, m.sp, task, row.stop_ids)
        matcher = StopMatcher(list(job.get("stop") or [])) if task == "complete" else None
        prompt_tokens = len(row.prompt.encoder_ids)
        yield {"type": "start", "prompt_tokens": prompt_tokens, "model": m.uri}
        logprobs: list[float] = []
        sent = ""  # the complete task's text sent so far (after stop-sequence matching)
        stop_reason = "length"
        endpoint = job.get("endpoint", "")
        self.waiting += 1
        self.m_waiting.set(self.waiting)
        try:
            async for steps in self.generate_batch(row):
                if isinstance(steps, dict):  # the batch failed
                    yield steps
                    return
                for step in steps:
                    logprobs.append(step.logprob)
                    field, delta = answer.feed(step.token)
                    raw = delta  # the token's own text (TGI streams it; OpenAI's text holds back a stop's start)
                    is_stop = step.token in row.stop_ids
                    if is_stop:
                        stop_reason = "eos"
                    if matcher is not None:
                        delta = matcher.feed(delta)
                        sent += delta
                    top = None
                    if step.top:
                        top = [{"id": t, "text": m.tokenizer.decode([t]), "logprob": lp, "special": t in m.special}
                               for t, lp in step.top]
                    yield {"type": "token", "id": step.token, "text": delta, "raw": raw, "field": field,
                           "logprob": step.logprob, "special": step.token in m.special, "stop": is_stop, "top": top}
                    if matcher is not None and matcher.matched is not None:
                        stop_reason = "stop_sequence"
                        row.cancelled = True
                        break
                if row.cancelled:
                    break
        finally:
            row.cancelled = True  # a client that left (cancelled) frees its row in the batch
            self.waiting -= 1
            self.m_waiting.set(self.waiting)
            self.m_tokens.inc(len(logprobs), tags={"endpoint": endpoint})
        texts, tail = {}, {}
        for field, (text, rest) in answer.finish().items():
            texts[field], tail[field] = text, rest
        if matcher is not None:  # the text is what was sent plus what the matcher lets through now
            rest = "" if matcher.matched is not None else matcher.feed(tail["text"]) + matcher.flush()
            if matcher.matched is not None:
                stop_reason = "stop_sequence"
            texts["text"], tail["text"] = sent + rest, rest
        yield {"type": "done", "answer": texts, "tail": tail,
               "finish_reason": "length" if stop_reason == "length" else "stop", "stop_reason": stop_reason,
               "stop": matcher.matched if matcher is not None else None, "generated_tokens": len(logprobs),
               "prompt_tokens": prompt_tokens, "mean_logprob": sum(logprobs) / len(logprobs) if logprobs else 0.0,
               "model": m.uri}

    # -- batches ----------------------------------------------------------------------------------

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def generate_batch(self, rows: list[Row]):
        """Per step, a list with one item per row: its new ``Step``s (a greedy row gets one a step, a beam
        row all at the end), ``[]`` while it waits for its group, StopIteration once it is done, or an error
        event. The model runs on this (user-code) event loop, not in a worker thread: Serve keeps health
        checks on its own loop, requests queue up while a batch runs, and the next batch takes them all
        (a thread fought the loop for the GIL and starved batching: mean batch 1.3 vs 14,
        bench/serve_load.py). Between two steps the loop forwards the streamed tokens."""
        from kilm_ray.model.generation import Step, beam_search, generation_groups, greedy_steps

        n = len(rows)
        self.stats.record(n)
        self.m_batch.observe(n, tags={"method": "generate"})
        by_model: dict[int, list[int]] = {}
        for i, r in enumerate(rows):
            by_model.setdefault(id(r.loaded), []).append(i)
        groups = []
        for members in by_model.values():
            m = rows[members[0]].loaded
            keys = [(len(rows[i].prompt.decoder_prefix), rows[i].max_new_tokens, rows[i].num_beams, rows[i].stop_ids)
                    for i in members]
            groups += [[members[j] for j in g] for g in generation_groups(keys, m.max_positions)]
        waiting: list[Any] = [[] for _ in range(n)]
        finished: set[int] = set()
        for group in groups:
            m = rows[group[0]].loaded
            encs = [rows[i].prompt.encoder_ids for i in group]
            prefixes = [rows[i].prompt.decoder_prefix for i in group]
            stops = [list(rows[i].stop_ids) for i in group]
            budgets = [rows[i].max_new_tokens for i in group]
            out = list(waiting)
            try:
                if rows[group[0]].num_beams > 1:
                    results = beam_search(m.model, encs, prefixes, m.sp.pad, stops, budgets, rows[group[0]].num_beams)
                    for i, g in zip(group, results):
                        out[i] = [Step(t, lp) for t, lp in zip(g.tokens, g.token_logprobs)]
                    yield out
                else:
                    top_n = max(rows[i].top_n for i in group)
                    for step in greedy_steps(m.model, encs, prefixes, m.sp.pad, stops, budgets, top_n,
                                             stopped=lambda j: rows[group[j]].cancelled,
                                             no_repeat_ngram_size=[rows[i].no_repeat_ngram_size for i in group]):
                        out = list(waiting)
                        for i, s in zip(group, step):
                            if s is not None:
                                if rows[i].top_n < top_n:
                                    s.top = s.top[: rows[i].top_n] or None
                                out[i] = [s]
                            elif i not in finished:  # done before its neighbours: its answer goes now
                                out[i] = StopIteration
                                finished.add(i)
                        yield out
                        await asyncio.sleep(0)
            except Exception as exc:  # noqa: BLE001 - every row of the group gets the error, the replica lives on
                log.exception("generation failed on a batch of %d requests", len(group))
                out = list(waiting)
                for i in group:
                    out[i] = _failure(exc, len(group))
                yield out
            done = list(waiting)
            for i in group:
                if i not in finished:
                    done[i] = StopIteration
            yield done

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def score_batch(self, items: list[tuple]) -> list:
        from kilm_ray.model.generation import score_candidates

        self.stats.record(len(items))
        self.m_batch.observe(len(items), tags={"method": "score"})
        # Each request is scored on its own (one encoder pass, candidates in token-budget sub-batches): its
        # scores never depend on which requests shared the batch, and memory is bounded per forward.
        budget = int(self.settings["score_token_budget"])
        out = []
        for m, prompt, continuations in items:
            try:
                out.append(score_candidates(m.model, prompt.encoder_ids, prompt.decoder_prefix, continuations,
                                            m.sp.pad, budget))
            except Exception as exc:  # noqa: BLE001
                log.exception("scoring failed")
                out.append(_failure(exc, len(items)))
        return out

    async def disambiguate(self, job: dict) -> dict:
        """Rank the candidates' knowledge strings by their mean log-probability after the mention."""
        from kilm_ray.method.probes import (
            ProbeError, candidate_continuation, control_tokens, describe_prompt, mention_parts, refuse_control_tokens,
        )

        m = self.loaded
        f = job["fields"]
        try:
            left, mention, right = mention_parts(f.get("text"), f.get("left"), f.get("mention"), f.get("right"))
            if f.get("text") is not None:
                refuse_control_tokens("text", left + mention + right, control_tokens(m.tokenizer))
            prompt = describe_prompt(m.tokenizer, m.sp, left, mention, right)
            self._check_length(m, prompt)
            # Each candidate is cut to fit: the server's cap and the positions left after the prefix.
            room = min(int(self.settings["max_candidate_tokens"]), m.max_positions - len(prompt.decoder_prefix))
            continuations = [candidate_continuation(m.tokenizer, m.sp, c["title"], c["description"], room,
                                                    f"candidates.{i}") for i, c in enumerate(f["candidates"])]
        except (ProbeError, InputTooLong) as exc:
            return _refused_input(exc)
        scores = await self.score_batch((m, prompt, continuations))
        if isinstance(scores, dict):
            return scores
        ranked = sorted(((lp / max(n, 1), lp, c) for (lp, n), c in zip(scores, f["candidates"])), key=lambda t: -t[0])
        return {"ranking": [{"title": c["title"], "description": c["description"], "mean_logprob": mean,
                             "logprob": lp, "rank": i + 1} for i, (mean, lp, c) in enumerate(ranked)]}

    async def tokenize(self, job: dict) -> list[dict]:
        """TGI's ``/tokenize``: the input's tokens as this export's tokenizer splits it (BART's <s> and </s>
        included, as the encoder sees them), with character offsets (0, 0 for the added ones)."""
        m = self.loaded
        text = job["text"]
        enc = m.tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
        return [{"id": int(i), "text": text[a:b], "start": int(a), "stop": int(b)}
                for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"])]

    def info(self) -> dict:
        m = self.loaded
        return {"model": m.uri, "meta": m.meta, "device": self.device, "dtype": self.dtype,
                "parameters": sum(p.numel() for p in m.model.parameters()), "batching": self.stats.summary(),
                "waiting": self.waiting,
                "pid": os.getpid(), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
