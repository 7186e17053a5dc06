"""The knowledge-probe service over real HTTP on 127.0.0.1: every endpoint, dynamic batching, bad
requests (4xx naming the problem), back-pressure (503, replicas survive) and bearer-token auth."""

import concurrent.futures as cf
import json

import httpx
import pytest

from kilm_ray.cluster import free_local_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def service(ray_cluster, trained_export, tiny_config):
    from ray import serve

    from kilm_ray.serve.app import build_application

    settings = tiny_config.to_dict()["serve"]
    settings.update(port=free_local_port(), host="127.0.0.1", max_batch_size=8, batch_wait_timeout_s=0.2,
                    max_input_tokens=64, max_candidates=4, max_request_bytes=4096)
    serve.start(http_options={"host": "127.0.0.1", "port": settings["port"]})
    serve.run(build_application(trained_export, settings), name="kilm", route_prefix="/")
    tight = dict(settings, max_queued_requests=1, max_ongoing_requests=1, max_batch_size=1, batch_wait_timeout_s=0.0)
    serve.run(build_application(trained_export, tight), name="tight", route_prefix="/tight")
    locked = dict(settings, auth_token="s3cret")
    serve.run(build_application(trained_export, locked), name="locked", route_prefix="/locked")
    url = f"http://127.0.0.1:{settings['port']}"
    yield url
    serve.shutdown()


def post(url, path, body, **kw):
    return httpx.post(f"{url}{path}", json=body, timeout=120, **kw)


def test_every_endpoint_answers(service):
    assert httpx.get(f"{service}/healthz").json() == {"status": "ok"}
    info = httpx.get(f"{service}/v1/model").json()
    assert info["special_tokens"] == ["<ent>", "</ent>", "<ent_desc>", "</ent_desc>", "<sep>"]
    assert info["step"] == 30 and info["generation_defaults"]["max_new_tokens"] > 0
    text = "Aristotle was a Greek <ent>philosopher</ent> and polymath."
    a = post(service, "/v1/describe", {"text": text})
    b = post(service, "/v1/describe", {"left": "Aristotle was a Greek ", "mention": "philosopher",
                                        "right": " and polymath."})
    assert a.status_code == b.status_code == 200, (a.text, b.text)
    assert a.json() == b.json()
    assert set(a.json()) == {"title", "description", "score"} and a.json()["score"] <= 0
    r = post(service, "/v1/disambiguate", {"text": text, "candidates": [
        {"title": "Philosopher", "description": "a specialist in philosophy"},
        {"title": "Philosophy", "description": "the rational investigation of questions about existence"},
        {"title": "Polymath", "description": "a person of great and varied learning"}]})
    ranking = r.json()["ranking"]
    assert r.status_code == 200 and [c["rank"] for c in ranking] == [1, 2, 3]
    assert ranking[0]["score"] >= ranking[1]["score"] >= ranking[2]["score"]
    r = post(service, "/v1/appositive", {"text": "Aristotle, <appos>, taught Alexander.", "mention": "Aristotle"})
    assert r.status_code == 200 and set(r.json()) == {"appositive", "title", "score"}
    r = post(service, "/v1/qa", {"question": "Who taught Alexander the Great?", "max_new_tokens": 8})
    assert r.status_code == 200 and isinstance(r.json()["answer"], str)
    r = post(service, "/v1/fill", {"text": "Aristotle was a Greek <mask> and polymath.", "num_beams": 2})
    assert r.status_code == 200 and isinstance(r.json()["text"], str)


def test_concurrent_requests_are_batched_with_unchanged_answers(service):
    texts = [f"In {1900 + i}, the <ent>philosopher</ent> wrote about {w}." for i, w in
             enumerate(["Greece", "ethics", "logic", "Plato", "physics", "politics", "rhetoric", "poetry"] * 2)]
    alone = [post(service, "/v1/describe", {"text": t}).json() for t in texts[:4]]
    before = httpx.get(f"{service}/v1/model").json()["batching"]
    with cf.ThreadPoolExecutor(len(texts)) as pool:
        together = list(pool.map(lambda t: post(service, "/v1/describe", {"text": t}), texts))
    assert all(r.status_code == 200 for r in together)
    after = httpx.get(f"{service}/v1/model").json()["batching"]
    assert after["largest_batch"] > 1 and after["batches"] - before["batches"] < len(texts)
    # Batching (left-padded prefixes of different lengths) does not change any answer.
    for single, batched in zip(alone, together[:4]):
        assert single["title"] == batched.json()["title"] and single["description"] == batched.json()["description"]
        assert single["score"] == pytest.approx(batched.json()["score"], abs=1e-4)


@pytest.mark.parametrize("path, body, status, message", [
    ("/v1/describe", '{"text": "broken', 400, "not valid JSON"),
    ("/v1/describe", {"mention": 3}, 422, "mention: Input should be a valid string"),
    ("/v1/describe", {"left": "x"}, 422, "missing the mention"),
    ("/v1/describe", {"text": "no marked mention"}, 422, "must mark the mention as <ent>...</ent>"),
    ("/v1/describe", {"text": "a <ent>b</ent>", "mention": "b"}, 422, "not both"),
    ("/v1/describe", {"text": "a <ent>b</ent>", "temperature": 2}, 422, "temperature: Extra inputs are not permitted"),
    ("/v1/describe", {"text": "a <ent>b</ent>", "max_new_tokens": 10000}, 422, "above the server limit"),
    ("/v1/describe", {"text": "a <ent>b</ent>", "num_beams": 99}, 422, "num_beams: 99 is above the server limit"),
    ("/v1/describe", {"text": "word " * 200 + "<ent>b</ent>"}, 413, "tokens; the limit is 64"),
    ("/v1/describe", {"text": "x" * 5000 + "<ent>b</ent>"}, 413, "the limit is 4096"),
    ("/v1/appositive", {"text": "Aristotle <appos> taught.", "mention": "Plato"}, 422, "does not occur before the slot"),
    ("/v1/appositive", {"text": "Aristotle taught.", "mention": "Aristotle"}, 422, "exactly once"),
    ("/v1/disambiguate", {"text": "a <ent>b</ent>", "candidates": [{"title": f"T{i}"} for i in range(5)]}, 422,
     "5 given; the limit is 4"),
    ("/v1/disambiguate", {"text": "a <ent>b</ent>", "candidates": []}, 422, "candidates"),
    ("/v1/qa", {"question": ""}, 422, "question"),
    ("/v1/fill", {"text": "no mask here"}, 422, "at least one <mask>"),
])
def test_bad_requests_get_a_4xx_that_names_the_problem(service, path, body, status, message):
    if isinstance(body, str):
        r = httpx.post(f"{service}{path}", content=body, headers={"content-type": "application/json"})
    else:
        r = post(service, path, body)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]


def test_overload_answers_503_and_the_service_survives(service):
    body = {"text": "Aristotle was a Greek <ent>philosopher</ent>.", "max_new_tokens": 32}
    with cf.ThreadPoolExecutor(24) as pool:
        codes = list(pool.map(lambda _: post(service, "/tight/v1/describe", body).status_code, range(24)))
    assert 503 in codes and 200 in codes and set(codes) <= {200, 503}
    assert post(service, "/tight/v1/describe", body).status_code == 200  # still serving afterwards


def test_bearer_token_authentication(service):
    body = {"text": "a <ent>philosopher</ent>"}
    r = post(service, "/locked/v1/describe", body)
    assert r.status_code == 401 and "bearer token" in r.json()["error"]
    assert post(service, "/locked/v1/describe", body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert post(service, "/locked/v1/describe", body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert httpx.get(f"{service}/locked/healthz").status_code == 200  # health checks stay open
    assert post(service, "/v1/describe", body).status_code == 200  # auth is off by default


def test_probe_command_line_client(service, capsys):
    from kilm_ray.cli import main

    assert main(["probe", "describe", "Aristotle was a <ent>philosopher</ent>.", "--url", service]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"title", "description", "score"}
    assert main(["probe", "fill", "no mask", "--url", service]) == 1
    assert "HTTP 422" in capsys.readouterr().err
