"""The service's defences, without Ray: stop sequences (any split of the text, bounded cost), where the
bearer token comes from and when one is required, the JSON-only body, and a streamed answer whose client
leaves, through a real uvicorn server (ASGI spec 2.3, as Serve's proxy runs it)."""

import asyncio
import threading
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kilm_ray.cluster import free_local_port
from kilm_ray.serve import gate as serve_gate
from kilm_ray.serve import protocols as proto

# ----------------------------------------------------------------------------------------------
# Stop sequences
# ----------------------------------------------------------------------------------------------


def expected_stop(text: str, deltas: list[str], stops: list[str]):
    """The reference: at each delta boundary, the first stop found in everything so far (earliest start,
    then the smaller string) ends the answer before it; else the whole text."""
    seen = ""
    for delta in deltas:
        seen += delta
        found = [(seen.find(s), s) for s in stops if s in seen]
        if found:
            at, stop = min(found)
            return seen[:at], stop
    return text, None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.text(alphabet="ab<>", max_size=6), max_size=12),
       st.lists(st.text(alphabet="ab<>", min_size=1, max_size=5), min_size=1, max_size=4))
def test_stop_matching_is_the_same_for_any_split_of_the_text(deltas, stops):
    text = "".join(deltas)
    matcher = proto.StopMatcher(stops)
    sent = "".join(matcher.feed(d) for d in deltas)
    if matcher.matched is None:
        sent += matcher.flush()
    assert (sent, matcher.matched) == expected_stop(text, deltas, stops)


@given(st.text(alphabet="ab", max_size=40), st.text(alphabet="ab", min_size=1, max_size=8))
def test_held_suffix_is_the_longest_proper_suffix_that_begins_the_stop(text, stop):
    want = max((k for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)
    assert proto.held_suffix(text, stop) == want


def test_long_stop_sequences_are_refused_by_name_in_both_protocols():
    long = "x" * 15_000
    with pytest.raises(ValueError, match="parameters.stop: a stop sequence of 15000 characters; the limit is 64"):
        proto.tgi_job(proto.TgiRequest(inputs="a", parameters={"stop": [long]}), 8)
    with pytest.raises(ValueError, match="stop: a stop sequence of 15000 characters; the limit is 64"):
        proto.openai_jobs(proto.CompletionRequest(model="m", prompt="a", stop=long), 4)
    assert proto.openai_jobs(proto.CompletionRequest(model="m", prompt="a", stop="x" * 200), 4, max_stop_chars=200)


def test_the_work_per_token_does_not_grow_with_the_answer():
    """Whatever was generated before, a token costs the same: the matcher holds back less than a stop's
    length, so each feed searches a bounded window (counted in characters held, not timed)."""
    stops = ["ab" * 31 + "ac", "ba" * 31 + "bc", "a" * 63 + "c", "<" * 63 + ">"]  # each nearly matches, none does
    matcher = proto.StopMatcher(stops)
    held = []
    for i in range(20_000):
        matcher.feed("ab"[i % 2] if i % 97 else "<")
        held.append(len(matcher.pending))
    assert matcher.matched is None and max(held) < 64


# ----------------------------------------------------------------------------------------------
# The bearer token and the body's type
# ----------------------------------------------------------------------------------------------


def test_the_token_comes_from_a_file_or_the_environment_never_the_config(tmp_path):
    from kilm_ray.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="serve.auth_token': removed.*KILM_SERVE_TOKEN.*auth_token_file"):
        load_config(None, ["serve.auth_token=s3cret"])
    local = {"auth": "auto", "host": "127.0.0.1", "auth_token_env": "KILM_SERVE_TOKEN", "auth_token_file": None}
    assert serve_gate.service_token(local, {}) is None  # a laptop's loopback service may be open
    assert serve_gate.service_token(local, {"KILM_SERVE_TOKEN": "t"}) == "t"
    public = dict(local, host="0.0.0.0")
    with pytest.raises(serve_gate.AuthSetupError, match="requires a bearer token .*KILM_SERVE_TOKEN.*serve.auth=open"):
        serve_gate.service_token(public, {})
    assert serve_gate.service_token(dict(public, auth="open"), {"KILM_SERVE_TOKEN": "t"}) is None
    token = tmp_path / "token"
    token.write_text("from-the-secret\n")
    assert serve_gate.service_token(dict(public, auth_token_file=str(token)), {"KILM_SERVE_TOKEN": "t"}) == \
        "from-the-secret"
    token.write_text("")
    with pytest.raises(serve_gate.AuthSetupError, match="is empty"):
        serve_gate.service_token(dict(public, auth_token_file=str(token)), {})


def test_kilm_ray_serve_refuses_a_public_address_without_a_token(tmp_path, capsys, monkeypatch):
    from kilm_ray.cli import main

    monkeypatch.delenv("KILM_SERVE_TOKEN", raising=False)
    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text("{}")
    assert main(["serve", "--model", str(export), "--host", "0.0.0.0"]) == 2
    assert "requires a bearer token" in capsys.readouterr().err


@pytest.mark.parametrize("content_type, refused", [
    ("application/json", False), ("application/json; charset=utf-8", False), ("application/merge-patch+json", False),
    ("text/plain", True), ("application/x-www-form-urlencoded", True), ("multipart/form-data; boundary=x", True),
    (None, True)])
def test_only_json_bodies_are_read(content_type, refused):
    """The three types (and none) a page may send cross-site without a CORS preflight are refused."""
    problem = serve_gate.json_content_type_problem(content_type)
    assert bool(problem) == refused
    if refused:
        assert "Content-Type must be application/json" in problem and "-H 'Content-Type: application/json'" in problem


# ----------------------------------------------------------------------------------------------
# A client that leaves a stream, through a real uvicorn server
# ----------------------------------------------------------------------------------------------


def test_a_client_that_leaves_a_stream_cancels_it_under_uvicorns_asgi_spec(request_log):
    """uvicorn reports ASGI spec 2.3: Starlette then watches for the disconnect itself and returns normally
    when it comes. The stream must still count as left (499) and cancel its model stream, and its slot is
    freed; a client that reads to the end is a 200."""
    import uvicorn
    from fastapi import FastAPI

    cancelled = []

    class ModelStream:  # Serve's DeploymentResponseGenerator: only cancel() is called here
        def cancel(self):
            cancelled.append(True)

    async def tokens(n: int):
        for i in range(n):
            yield f"data: {i}\n\n".encode()
            await asyncio.sleep(0.02)

    api = FastAPI()
    api.router.route_class = serve_gate.GatedRoute

    @api.post("/v1/stream-probe")
    async def stream_probe(n: int = 500):
        return serve_gate.sse_response(tokens(n), [ModelStream()])

    port = free_local_port()
    server = uvicorn.Server(uvicorn.Config(api, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    gate = serve_gate.current_gate()
    before = gate.in_flight
    thread.start()
    try:
        deadline = time.time() + 30
        while not server.started:
            assert time.time() < deadline
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}/v1/stream-probe"
        with httpx.stream("POST", url, json={}, timeout=30) as r:
            assert r.status_code == 200
            next(r.iter_bytes())  # one event, then the client goes
        deadline = time.time() + 30
        while not cancelled:
            assert time.time() < deadline, "the model stream of a client that left was never cancelled"
            time.sleep(0.05)
        assert httpx.post(f"{url}?n=3", json={}, timeout=30).text.count("data:") == 3
        while gate.in_flight != before:
            assert time.time() < deadline
            time.sleep(0.05)
    finally:
        server.should_exit = True
        thread.join(30)
    statuses = [r.getMessage().split()[2] for r in request_log.records if "/v1/stream-probe" in r.getMessage()]
    assert statuses == ["499", "200"] and cancelled == [True]
