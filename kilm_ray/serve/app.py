"""The Ray Serve application: a thin FastAPI ingress and one model deployment, built, run and stopped here.

    HTTP --> gate (auth, draining, admission, streamed body limit) --> ProbeAPI (FastAPI, CPU: validates,
         translates the protocols, streams) --handle--> KilmModel (tokenizes, batches, generates, decodes)

Routes: the probe API (``/v1/describe``, ``/v1/disambiguate``, ``/v1/appositive``, ``/v1/qa``, ``/v1/fill``,
streaming with ``"stream": true``), Hugging Face TGI (``POST /generate``, ``/generate_stream``, ``/``),
OpenAI completions (``POST /v1/completions``, ``GET /v1/models``), a page to try probes (``GET /``), and
``/docs`` + ``/openapi.json``. Every route passes the gate and is counted in the metrics; errors are
JSON in the route's protocol (``protocols.error_body``).

    gate.py      auth, draining, admission, the body limit, errors in the route's protocol, counting
    api.py       the FastAPI routes of the ingress (``ProbeAPI``) and its published schema
    replica.py   the model deployment (``KilmModel``): tokenizes, batches, generates, decodes
    protocols.py TGI, OpenAI and SSE translations; schemas.py the probe API's bodies

The export is the model deployment's ``user_config`` (``{"model": uri}``): a new export is rolled out by
``reconfigure`` while the old one keeps answering; each request runs on the export that tokenized it
(``replica.py``). The ingress's ``user_config`` is ``{"draining": bool}``: a graceful stop sets it, and
from then on new requests get 503 while those in flight finish.

Metrics (``ray.serve.metrics``, on Ray's Prometheus endpoint, tagged with deployment and replica):
``kilm_http_requests`` (endpoint, status), ``kilm_http_request_latency_ms`` (endpoint; streams: to their
last byte), ``kilm_http_in_flight``, ``kilm_model_batch_size`` (method), ``kilm_model_waiting_requests``,
``kilm_generated_tokens`` (endpoint). Each request is logged once by the ingress on the ``ray.serve``
logger (structured, with Serve's request id).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from ray import serve

from kilm_ray.serve.api import ProbeAPI, admission_limit
from kilm_ray.serve.replica import KilmModel

log = logging.getLogger("kilm_ray.serve")


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """The deployments' version: a hash of kilm_ray's source. Serve restarts replicas whose version changed
    and only reconfigures those whose ``user_config`` did, so a new export or draining reconfigures the
    running replicas in place, while new code restarts them. (Ray 2.60 gives every ``serve.run`` a random
    version otherwise: each redeploy was a full rolling restart, model load included. Setting it takes
    Serve's internal flag; a ``serve deploy`` config gets the same from its import path.)"""
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(p for p in package.rglob("*") if p.is_file() and p.suffix in (".py", ".html")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _versioned(deployment):
    return deployment.options(version=code_version(), _internal=True)


INGRESS_BODY_ROOM = 1024  # requests an ingress replica holds beyond admission: bodies arriving, fast refusals


def build_application(model_uri: str, settings: dict, draining: bool = False):
    """The bound application (ingress + model) for ``serve.run``; ``settings`` = the serve config.

    The export is the model deployment's ``user_config``: running this again with another ``model_uri``
    under the same application name rolls the new export out in place (``reconfigure``), without new
    replicas. ``draining=True`` (the ingress's ``user_config``) refuses new requests with 503."""
    s = settings
    logging_config = {"encoding": s["log_encoding"], "enable_access_log": s["access_log"]}
    # Serve also writes every replica log line to stderr, which Ray forwards to the driver: a second copy of
    # each request line, shipped and printed at the request rate. The files under logs/serve keep them all.
    quiet = {"runtime_env": {"env_vars": {"RAY_SERVE_LOG_TO_STDERR": "1" if s["log_to_stderr"] else "0"}}}
    graceful = {"graceful_shutdown_timeout_s": float(s["drain_timeout_s"]), "graceful_shutdown_wait_loop_s": 0.5}
    model_options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": s["num_cpus"], "num_gpus": s["num_gpus"], **quiet},
        "max_ongoing_requests": s["max_ongoing_requests"],
        "max_queued_requests": s["max_queued_requests"],
        # The ingress logs each HTTP request; a second line per internal call would cost the busiest process.
        "user_config": {"model": str(model_uri)}, "logging_config": dict(logging_config, enable_access_log=False),
        **graceful,
    }
    if s["autoscaling"]:
        model_options["autoscaling_config"] = {"min_replicas": s["min_replicas"], "max_replicas": s["max_replicas"],
                                               "target_ongoing_requests": s["target_ongoing_requests"]}
    else:
        model_options["num_replicas"] = s["num_replicas"]
    model = _versioned(KilmModel.options(**model_options)).bind(s)
    admission = admission_limit(s)
    ingress = _versioned(ProbeAPI.options(
        ray_actor_options={"num_cpus": s["ingress_cpus"], **quiet},
        num_replicas=s["ingress_replicas"],
        # Our gate answers 503 at `admission`; Serve's own limit sits above it, with room for the fast 503s and
        # for requests whose bodies are still arriving (they hold no admission slot, but Serve counts them: a
        # few hundred slow bodies within 64 of the limit queued every normal request behind them), and Serve
        # never queues for the ingress, so every 503 a client sees has the same JSON body.
        max_ongoing_requests=admission + INGRESS_BODY_ROOM if admission else
        max(s["max_ongoing_requests"], 2 * s["max_batch_size"]) + INGRESS_BODY_ROOM,
        max_queued_requests=-1,
        user_config={"draining": bool(draining)}, logging_config=logging_config, **graceful,
    ))
    return ingress.bind(model, s)


def app_builder(args: dict):
    """``serve run kilm_ray.serve.app:app_builder model=DIR [config=YAML] [serve.port=...]`` and Serve
    config files (``import_path: kilm_ray.serve.app:app_builder``)."""
    model, settings = deploy_settings(args)
    return build_application(model, settings)


def deploy_settings(args: dict) -> tuple[str, dict]:
    """A Serve config file's args as (model URI, serve settings). Its proxy may listen anywhere, so
    ``serve.auth=auto`` means required here: the application does not start without its token."""
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
    settings = load_config(config, overrides).to_dict()["serve"]
    if settings["auth"] == "auto":
        settings["auth"] = "required"
    return str(model), settings


ROUTES_LINE = ("probes POST /v1/describe /v1/disambiguate /v1/appositive /v1/qa /v1/fill; TGI POST /generate "
               "/generate_stream; OpenAI POST /v1/completions; a page at /; schema at /docs")


def run_service(model_uri: str, serve_settings: dict):
    """Start Serve's HTTP proxy on host:port and deploy the application; returns (handle, url)."""
    serve.start(http_options={"host": serve_settings["host"], "port": serve_settings["port"],
                              "request_timeout_s": serve_settings["request_timeout_s"]})
    handle = serve.run(build_application(model_uri, serve_settings), name=serve_settings["app_name"],
                       route_prefix="/", blocking=False)
    url = f"http://{serve_settings['host']}:{serve_settings['port']}"
    log.info("kilm probes served at %s (%s)", url, ROUTES_LINE)
    return handle, url


class StopSignals:
    """SIGTERM (what systemd and Kubernetes send) and SIGINT (Ctrl-C) as a request to stop gracefully,
    instead of Ray's fatal-signal handler and its stack dump; a second signal cuts the wait short."""

    def __init__(self):
        self.event = threading.Event()
        self.received: list[str] = []

    def install(self) -> "StopSignals":
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received.append(signal.Signals(signum).name)
        self.event.set()

    def wait(self) -> str:
        while not self.event.wait(0.5):
            pass
        return self.received[0]

    @property
    def forced(self) -> bool:
        return len(self.received) > 1


def drain_and_stop(model_uri: str, settings: dict, signals: StopSignals, owns_ray: bool) -> str:
    """Refuse new requests (503), let those in flight finish for at most ``serve.drain_timeout_s``, stop
    Serve (and the local Ray this process started); returns the one line to print."""
    import ray

    started = time.monotonic()
    name = settings["app_name"]
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # the redeploy's INFO lines: not the user's news
    ingress = serve.get_app_handle(name)
    in_flight = left = 0
    try:
        in_flight = ingress.in_flight.remote().result(timeout_s=10)
        serve.run(build_application(model_uri, settings, draining=True), name=name, route_prefix="/", blocking=False)
        deadline = started + float(settings["drain_timeout_s"])
        while not signals.forced:
            left = ingress.in_flight.remote().result(timeout_s=10)
            if left == 0 or time.monotonic() >= deadline:
                break
            time.sleep(0.2)
    except Exception as exc:  # noqa: BLE001 - stopping anyway
        log.warning("draining failed (%s: %s); stopping now", type(exc).__name__, exc)
    if owns_ray:  # the whole local Ray goes (serve.shutdown first leaves task-failure lines on the terminal)
        ray.shutdown()
    else:
        serve.delete(name)
    took = time.monotonic() - started
    cut = f", {left} cut off at the {settings['drain_timeout_s']} s limit" if left else ""
    return (f"kilm-ray serve: stopped on {signals.received[0]} in {took:.1f} s: {in_flight} request(s) in flight "
            f"finished{cut}; new requests got 503 meanwhile")
