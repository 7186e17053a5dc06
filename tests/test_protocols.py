"""The standard protocols: Hugging Face's TGI (``/generate``, ``/generate_stream``, ``/``) driven by the real
``huggingface_hub.InferenceClient``, and OpenAI completions (``/v1/completions``) driven by the real
``openai`` client, streaming and not, against the shared Serve on 127.0.0.1 (conftest.py); auth, limits,
control-token refusal and metrics on these routes too. The pure translation functions first."""

import json
import time

import httpx
import pytest

from kilm_ray.serve import protocols as proto

from conftest import METRICS_PORT, SERVE_TOKEN

PROMPT = "Aristotle was a Greek"
MARKED = "Aristotle was a Greek <ent>philosopher</ent>."


# ----------------------------------------------------------------------------------------------
# Pure functions
# ----------------------------------------------------------------------------------------------


def test_stop_matcher_holds_back_what_could_begin_a_stop_sequence():
    m = proto.StopMatcher(["</b>", "END"])
    sent = [m.feed(d) for d in ("abc <", "/", "x", " E", "N", "D tail")]
    assert "".join(sent) == "abc </x " and m.matched == "END" and m.flush() == ""
    m = proto.StopMatcher(["zz"])
    assert m.feed("a z") == "a " and m.flush() == "z" and m.matched is None
    assert proto.StopMatcher([]).feed("anything") == "anything"


def test_error_bodies_per_protocol():
    assert proto.error_body("kilm", 422, "x: bad", ["x: bad"]) == {"error": "x: bad", "problems": ["x: bad"]}
    assert proto.error_body("kilm", 503, "full; retry later", retry_after_s=1) == {"error": "full; retry later",
                                                                                   "retry_after_s": 1}
    # TGI's statuses and types: overloaded 429, a failed generation 424, an over-long input 422 validation; a
    # 401 has no TGI type (its client raises the plain HTTP error, not UnknownError).
    status = proto.protocol_status
    assert [status("tgi", s) for s in (503, 500, 422, 401)] == [429, 424, 422, 401]
    assert status("tgi", 413, "context_length_exceeded") == 422 and status("tgi", 413) == 413
    assert proto.error_body("tgi", 429, "full") == {"error": "full", "error_type": "overloaded"}
    assert proto.error_body("tgi", 424, "failed")["error_type"] == "generation"
    assert proto.error_body("tgi", 422, "bad")["error_type"] == "validation"
    assert proto.error_body("tgi", 401, "who") == {"error": "who"}
    # OpenAI: 400 for what it cannot take and for an over-long input (context_length_exceeded), the field named.
    assert status("openai", 422) == 400 and status("openai", 413, "context_length_exceeded") == 400
    assert proto.error_body("openai", 404, "no", code="model_not_found") == {
        "error": {"message": "no", "type": "invalid_request_error", "param": None, "code": "model_not_found"}}
    assert proto.error_body("openai", 400, "stream_options: only allowed when stream is true")["error"]["param"] == \
        "stream_options"
    assert proto.error_body("openai", 400, "parameters.max_new_tokens: too many")["error"]["param"] == \
        "parameters.max_new_tokens"
    assert proto.error_body("openai", 503, "full")["error"]["type"] == "server_error"
    assert proto.sse({"a": "é"}, "delta") == 'event: delta\ndata: {"a":"é"}\n\n'.encode()


def test_protocol_details_as_the_specs_say():
    # OpenAI's top_logprobs is keyed by text: of two alternatives with one text, the likelier stays.
    top = [{"text": " a", "logprob": -0.1}, {"text": "b", "logprob": -1.0}, {"text": " a", "logprob": -2.0}]
    assert proto._top_by_text(top) == {" a": -0.1, "b": -1.0}
    # "usage": null on every chunk when usage was asked for; absent otherwise.
    assert proto.openai_chunk("c", "m", 1, 0, "x", with_usage=True)["usage"] is None
    assert "usage" not in proto.openai_chunk("c", "m", 1, 0, "x")
    with pytest.raises(ValueError, match="stream_options: only allowed when stream is true"):
        proto.openai_jobs(proto.CompletionRequest(model="m", prompt="x", stream_options={"include_usage": True}), 4)
    # TGI streams each token's own text; the last one completes generated_text (a stop sequence included).
    done = {"answer": {"text": "abc "}}
    assert proto.tgi_last_text("abc", {"raw": " EN", "text": ""}, done, "END") == " END"
    assert proto.tgi_last_text("ab", {"raw": "c ", "text": "c "}, done, None) == "c "


def test_unsupported_options_are_refused_by_name():
    with pytest.raises(ValueError) as err:
        proto.tgi_job(proto.TgiRequest(inputs="x", parameters={"temperature": 0.5, "do_sample": True, "top_k": 3}), 8)
    assert all(f"parameters.{k}: not supported" in str(err.value) for k in ("temperature", "do_sample", "top_k"))
    job = proto.tgi_job(proto.TgiRequest(inputs="x", parameters={"do_sample": False, "stop": ["."]}), 8)
    assert job["max_new_tokens"] == 8 and job["stop"] == ["."] and job["task"] == "complete"
    with pytest.raises(ValueError, match="n: not supported .only 1.*; best_of"):
        proto.openai_jobs(proto.CompletionRequest(model="m", prompt="x", n=2, best_of=3), 4)
    with pytest.raises(ValueError, match="prompt: 5 prompts; the limit is 4"):
        proto.openai_jobs(proto.CompletionRequest(model="m", prompt=["x"] * 5), 4)
    jobs = proto.openai_jobs(proto.CompletionRequest(model="m", prompt=["a", "b"], temperature=0, stop="."), 4)
    assert [j["fields"]["prompt"] for j in jobs] == ["a", "b"] and jobs[0]["stop"] == ["."]


# ----------------------------------------------------------------------------------------------
# The real clients against the real service
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("client, status", [("reads every byte", 200), ("gone before the body began", 499)])
def test_a_streamed_answer_frees_its_admission_slot_once_whatever_the_client_does(client, status,
                                                                                   request_log):
    """Through the gated route: the in-flight count of a stream is released once, when its ASGI call ends,
    also when the body never began (a body-iterator wrapper never ran its ``finally`` then: the slot leaked,
    and enough leaks answer 503); an answer the client left is logged as 499 and cancels its model stream."""
    import asyncio

    from fastapi import FastAPI

    from kilm_ray.serve import gate as serve_gate

    started, cancelled = [], []

    class ModelStream:  # stands in for Serve's DeploymentResponseGenerator: only cancel() is called here
        def cancel(self):
            cancelled.append(True)

    async def body():
        started.append(True)
        yield b"data: 1\n\n"

    api = FastAPI()
    api.router.route_class = serve_gate.GatedRoute

    @api.post("/v1/stream-probe")
    async def stream_probe():
        return serve_gate.sse_response(body(), [ModelStream()])

    async def receive():
        if not hasattr(receive, "sent"):
            receive.sent = True
            return {"type": "http.request", "body": b"{}", "more_body": False}
        await asyncio.sleep(3600)  # no disconnect message: the client stays until a send fails

    async def send(message):
        if client != "reads every byte":
            raise OSError("client disconnected")

    scope = {"type": "http", "asgi": {"spec_version": "2.4", "version": "3.0"}, "http_version": "1.1",
             "method": "POST", "path": "/v1/stream-probe", "raw_path": b"/v1/stream-probe", "root_path": "",
             "scheme": "http", "query_string": b"", "headers": [(b"content-type", b"application/json")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    gate = serve_gate.current_gate()
    before = gate.in_flight
    try:
        asyncio.run(api(scope, receive, send))
    except Exception:  # noqa: BLE001 - the disconnect may surface; what matters is the gate after it
        pass
    assert gate.in_flight == before
    assert started == ([True] if client == "reads every byte" else [])
    assert cancelled == ([] if status == 200 else [True])
    logged = [r.getMessage().split()[:3] for r in request_log.records if "/v1/stream-probe" in r.getMessage()]
    assert logged == [["POST", "/v1/stream-probe", str(status)]], logged


@pytest.mark.slow  # a Serve run: the fast subset has none (docs/development.md)
def test_tgi_inference_client_streaming_and_not(service):
    from huggingface_hub import InferenceClient
    from huggingface_hub.errors import ValidationError

    client = InferenceClient(service, timeout=120)  # posts to the root route, as for a TGI server
    text = client.text_generation(PROMPT, max_new_tokens=8)
    assert isinstance(text, str) and text == httpx.post(
        f"{service}/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 8}}, timeout=120).json()["generated_text"]
    streamed = list(client.text_generation(PROMPT, max_new_tokens=8, stream=True))
    assert len(streamed) >= 2 and "".join(streamed) == text
    out = client.text_generation(PROMPT, max_new_tokens=8, details=True)
    assert out.generated_text == text and out.details.generated_tokens == len(out.details.tokens)
    assert out.details.finish_reason in ("length", "eos_token") and all(t.logprob <= 0 for t in out.details.tokens)
    events = list(client.text_generation(PROMPT, max_new_tokens=8, stream=True, details=True))
    assert events[-1].generated_text == text and events[-1].details.finish_reason == out.details.finish_reason
    assert [e.token.logprob for e in events] == pytest.approx([t.logprob for t in out.details.tokens], abs=1e-4)
    assert all(e.generated_text is None for e in events[:-1])
    # A marked mention asks for its knowledge, as /v1/describe does: the raw text is Title<sep>description.
    knowledge = client.text_generation(MARKED, max_new_tokens=12)
    probe = httpx.post(f"{service}/v1/describe", json={"text": MARKED, "max_new_tokens": 12}, timeout=120).json()
    if "<" not in knowledge.replace("<sep>", ""):
        title, _, description = knowledge.partition("<sep>")
        assert (title.strip(), description.strip()) == (probe["title"], probe["description"])
    # Stop sequences end the text with the sequence (TGI's way), streamed or not: the streamed token texts
    # join to exactly the text /generate gives.
    if len(text) >= 6:
        stop = text[3:6]
        cut = client.text_generation(PROMPT, max_new_tokens=8, stop=[stop], details=True)
        assert cut.generated_text == text[: text.index(stop)] + stop and cut.details.finish_reason == "stop_sequence"
        pieces = list(client.text_generation(PROMPT, max_new_tokens=8, stop=[stop], stream=True, details=True))
        assert "".join(e.token.text for e in pieces) == cut.generated_text == pieces[-1].generated_text
    # /generate ignores "stream" (TGI's does: its streaming route is /generate_stream).
    r = httpx.post(f"{service}/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 4}, "stream": True},
                   timeout=120)
    assert r.headers["content-type"] == "application/json" and "generated_text" in r.json()
    # TGI's informational routes: /info (what its clients read), /health, /tokenize; /metrics refused by name.
    info = InferenceClient(service, provider="hf-inference").get_endpoint_info()
    assert info["model_id"] == "kilm" and info["max_stop_sequences"] == 4 and info["max_best_of"] == 1
    assert info["max_total_tokens"] > info["max_input_tokens"] > 0
    assert httpx.get(f"{service}/health", timeout=60).status_code == 200
    tokens = httpx.post(f"{service}/tokenize", json={"inputs": PROMPT}, timeout=60).json()
    # Offsets as the tokenizer gives them (TGI's too): BPE's leading space is not in a word's span.
    assert all(PROMPT[t["start"]:t["stop"]] == t["text"] for t in tokens) and all(t["id"] >= 0 for t in tokens)
    assert "".join(t["text"] for t in tokens) == PROMPT.replace(" ", "")
    r = httpx.get(f"{service}/metrics", timeout=60)
    assert r.status_code == 404 and "Prometheus" in r.json()["error"] and r.json()["error_type"] == "validation"
    with pytest.raises(ValidationError, match="parameters.max_new_tokens: 999 is above the server limit"):
        client.text_generation(PROMPT, max_new_tokens=999)
    with pytest.raises(ValidationError, match="parameters.temperature: not supported"):
        client.text_generation(PROMPT, temperature=0.5)
    with pytest.raises(ValidationError, match="prompt: contains the reserved token <sep>"):
        client.text_generation("a <sep> b", stream=True)


@pytest.mark.slow
def test_openai_client_completions_streaming_and_not(service):
    import openai

    client = openai.OpenAI(base_url=f"{service}/v1", api_key="unused", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list()] == ["kilm"]
    out = client.completions.create(model="kilm", prompt=PROMPT, max_tokens=8, logprobs=2)
    tgi = httpx.post(f"{service}/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 8, "details": True}},
                     timeout=120).json()
    choice = out.choices[0]
    assert out.object == "text_completion" and out.model == "kilm" and choice.text == tgi["generated_text"]
    assert "".join(choice.logprobs.tokens) == choice.text and all(len(t) == 2 for t in choice.logprobs.top_logprobs)
    visible = [t for t in tgi["details"]["tokens"] if not (t["special"] and t["text"] == "")]
    assert choice.logprobs.token_logprobs == pytest.approx([t["logprob"] for t in visible][: len(choice.logprobs.tokens)],
                                                           abs=1e-4)
    assert out.usage.completion_tokens == tgi["details"]["generated_tokens"] and out.usage.prompt_tokens > 0
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    chunks = list(client.completions.create(model="kilm", prompt=PROMPT, max_tokens=8, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text and len(chunks) >= 3
    assert chunks[-1].usage.total_tokens == out.usage.total_tokens and chunks[-2].choices[0].finish_reason == choice.finish_reason
    two = client.completions.create(model="kilm", prompt=[PROMPT, MARKED], max_tokens=6)
    assert [c.index for c in two.choices] == [0, 1] and two.choices[0].text == client.completions.create(
        model="kilm", prompt=PROMPT, max_tokens=6).choices[0].text
    both = list(client.completions.create(model="kilm", prompt=[PROMPT, MARKED], max_tokens=6, stream=True))
    for c in two.choices:
        assert "".join(k.choices[0].text for k in both if k.choices[0].index == c.index) == c.text
    if len(choice.text) >= 6:  # a stop sequence is left out of the text
        stop = choice.text[3:6]
        cut = client.completions.create(model="kilm", prompt=PROMPT, max_tokens=8, stop=stop)
        assert cut.choices[0].text == choice.text[: choice.text.index(stop)] and cut.choices[0].finish_reason == "stop"
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model="kilm", prompt=PROMPT, max_tokens=8, stop=stop, stream=True))
        assert streamed == cut.choices[0].text
    with pytest.raises(openai.BadRequestError, match="temperature: not supported"):
        client.completions.create(model="kilm", prompt=PROMPT, temperature=0.7)
    with pytest.raises(openai.BadRequestError, match="max_tokens: 999 is above the server limit"):
        client.completions.create(model="kilm", prompt=PROMPT, max_tokens=999)
    with pytest.raises(openai.BadRequestError, match="prompt: contains the reserved token </s>"):
        client.completions.create(model="kilm", prompt="a </s> b", stream=True)
    with pytest.raises(openai.NotFoundError, match="is not served here"):
        client.completions.create(model="gpt-4", prompt=PROMPT)
    # What most OpenAI tools call first: the model by id, and chat (refused in OpenAI's shape, saying what to use).
    assert client.models.retrieve("kilm").id == "kilm"
    with pytest.raises(openai.NotFoundError, match="is not served here"):
        client.models.retrieve("gpt-4")
    with pytest.raises(openai.NotFoundError, match="chat completions are not served.*POST /v1/completions") as err:
        client.chat.completions.create(model="kilm", messages=[{"role": "user", "content": "hi"}])
    assert err.value.code == "unsupported_endpoint"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="kilm", prompt=PROMPT, stream_options={"include_usage": True})
    assert err.value.param == "stream_options"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="kilm", prompt="word " * 300)
    assert err.value.code == "context_length_exceeded" and "the limit is 64" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:  # a list is checked whole before any prompt generates
        client.completions.create(model="kilm", prompt=[PROMPT, "word " * 300], stream=True)
    assert err.value.code == "context_length_exceeded"
    raw = httpx.post(f"{service}/v1/completions", json={"model": "kilm", "prompt": PROMPT, "max_tokens": 4, "stream": True,
                                                        "stream_options": {"include_usage": True}}, timeout=120)
    frames = [json.loads(line[6:]) for line in raw.text.splitlines() if line.startswith("data: {")]
    assert all(f["usage"] is None for f in frames[:-1]) and frames[-1]["usage"]["total_tokens"] > 0


@pytest.mark.slow
def test_both_protocols_pass_the_gate(service):
    """Auth (before the body), the body limit and metrics apply to the protocol routes as to the probes."""
    import openai
    from huggingface_hub import InferenceClient
    from huggingface_hub.errors import HfHubHTTPError, TextGenerationError

    locked = f"{service}/locked"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{locked}/v1", api_key="wrong", max_retries=0).completions.create(
            model="kilm", prompt=PROMPT, max_tokens=2)
    ok = openai.OpenAI(base_url=f"{locked}/v1", api_key=SERVE_TOKEN, max_retries=0, timeout=120)
    assert ok.completions.create(model="kilm", prompt=PROMPT, max_tokens=2).choices[0].finish_reason == "length"
    with pytest.raises(HfHubHTTPError, match="401") as err:  # TGI has no auth: a plain HTTP error, not UnknownError
        InferenceClient(locked, token="wrong").text_generation(PROMPT, max_new_tokens=2)
    assert not isinstance(err.value, TextGenerationError)
    assert isinstance(InferenceClient(locked, token=SERVE_TOKEN, timeout=120).text_generation(PROMPT, max_new_tokens=2), str)
    for path in ("/generate", "/v1/completions"):
        r = httpx.post(f"{locked}{path}", content=b"x" * 100_000)
        assert r.status_code == 401  # not 413: the body of a stranger is not read
        r = httpx.post(f"{service}{path}", content=b'{"inputs": "' + b"x" * 5000 + b'"}',
                       headers={"content-type": "application/json"})
        assert r.status_code == 413 and "the limit is 4096" in str(r.json()["error"])
    with httpx.stream("POST", f"{service}/generate_stream", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 3}},
                      timeout=120) as r:
        assert r.status_code == 200 and r.read().decode().count("data:") == 3
    # This test's own successes and failures (it must not rely on what earlier tests asked).
    assert httpx.post(f"{service}/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 2}},
                      timeout=120).status_code == 200
    assert httpx.post(f"{service}/v1/completions", json={"model": "kilm"}, timeout=60).status_code == 400  # no prompt
    wanted = ['endpoint="/v1/completions"', 'endpoint="/generate_stream"', 'endpoint="/"', 'endpoint="/generate"']
    deadline, text = time.time() + 60, ""
    while time.time() < deadline:
        text = httpx.get(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=30).text
        lines = [line for line in text.splitlines() if line.startswith("ray_kilm_http_requests_total{")]
        # Each route's counter of successes, not just any of its counters (a 401 or 413 may be exported first).
        if all(any(w in line and 'status="200"' in line for line in lines) for w in wanted):
            break
        time.sleep(2)
    for w in wanted:
        assert any(w in line and 'status="200"' in line for line in lines), w
    assert any('endpoint="/v1/completions"' in line and 'status="400"' in line for line in lines)
