"""The serve section: the HTTP service, its replicas, batching and limits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from kilm_ray.config.fields import ConfigError, check_min, check_range, doc


@dataclass
class ServeConfig:
    host: str = doc("HTTP bind address.", default="127.0.0.1")
    port: int = doc("HTTP port.", default=8000)
    num_replicas: int = doc("Model replicas (ignored when autoscaling).", default=1)
    autoscaling: bool = doc("Scale replicas between min_replicas and max_replicas on load.", default=False)
    min_replicas: int = doc("Autoscaling lower bound.", default=1)
    max_replicas: int = doc("Autoscaling upper bound.", default=4)
    target_ongoing_requests: float = doc("Autoscaling target of requests per replica.", default=32.0)
    num_cpus: float = doc("CPUs per model replica.", default=1.0)
    num_gpus: float = doc("GPUs per model replica.", default=0.0)
    max_batch_size: int = doc("Dynamic batching: most requests per model call.", default=32)
    batch_wait_timeout_s: float = doc("Dynamic batching: wait this long to fill a batch.", default=0.01)
    max_ongoing_requests: int = doc("Requests a replica accepts at once (>= 2x batch to fill batches).", default=128)
    max_queued_requests: int = doc("Requests queued before the service answers 503 (back-pressure).", default=256)
    max_input_tokens: int = doc("Longest accepted encoder input, in tokens (longer: 413).", default=512)
    max_candidates: int = doc("Most candidates in one /v1/disambiguate request.", default=32)
    default_max_new_tokens: int = doc("Generation length when a request does not say.", default=48)
    max_new_tokens_limit: int = doc("Largest max_new_tokens a request may ask for.", default=128)
    max_beams: int = doc("Largest num_beams a request may ask for.", default=4)
    no_repeat_ngram_size: int = doc(
        "Greedy describe, appositive and QA answers never repeat an n-gram of their own (the prompt is not "
        "counted; /v1/fill, which rebuilds the whole text, completions and beam answers are not affected). 0 = off.",
        default=0)
    max_request_bytes: int = doc("Largest request body, counted as it streams in (larger: 413).", default=65536)
    max_candidate_tokens: int = doc(
        "Longest scored candidate ('Title<sep>description'), in tokens; longer descriptions are cut.", default=64)
    score_token_budget: int = doc("Padded decoder tokens per scoring forward pass (bounds memory).", default=4096)
    ingress_replicas: int = doc("HTTP ingress replicas (tokenize and validate; CPU only).", default=1)
    ingress_cpus: float = doc("CPUs per ingress replica.", default=0.1)
    log_encoding: Literal["JSON", "TEXT"] = doc(
        "Replica log format (JSON: one object per line with request_id, endpoint, status_code, latency_ms).",
        default="JSON")
    log_to_stderr: bool = doc(
        "Replica log lines also on stderr (forwarded to the driver / `ray job logs`); the files under the Ray "
        "session's logs/serve/ always have them.", default=False)
    access_log: bool = doc("Also Serve's own access line per HTTP request (ours, with endpoint, status, latency "
                            "and request id, is always written).", default=False)
    auth: Literal["auto", "required", "open"] = doc(
        "Bearer-token auth on every route but / and /healthz. required: the service does not start without a "
        "token; open: no token (anyone who reaches the port may call the model); auto: required unless serve.host is a loopback "
        "address (a Serve config file, whose proxy may listen anywhere, is always required). The token itself "
        "is never a config value (it would show on the dashboard): see auth_token_env and auth_token_file.",
        default="auto")
    auth_token_env: str = doc("Environment variable holding the bearer token (read by the ingress replicas).",
                              default="KILM_SERVE_TOKEN")
    auth_token_file: Optional[str] = doc(
        "File holding the bearer token (a mounted Kubernetes Secret; on `ray up`, the file cluster.yaml writes "
        "from Secrets Manager); wins over the environment variable.", default=None)
    body_timeout_s: float = doc(
        "A request body must arrive whole within this long (else 408); a slow body holds no admission slot "
        "meanwhile.", default=10.0)
    request_timeout_s: float = doc(
        "End-to-end limit of one HTTP request at Serve's proxy (`kilm-ray serve`; a Serve config file sets "
        "http_options.request_timeout_s). A client can lift it with the header x-request-timeout-seconds: 0: "
        "have the load balancer drop that header (docs/serving.md).", default=300.0)
    max_stop_chars: int = doc("Longest stop sequence a TGI or OpenAI request may give, in characters.", default=64)
    app_name: str = doc("Serve application name.", default="kilm")
    device: Literal["auto", "cpu", "cuda"] = doc("Device of a replica.", default="auto")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = doc("Weights dtype of a replica (auto: bf16 on GPU).", default="auto")
    drain_timeout_s: float = doc(
        "Graceful stop (SIGTERM, Ctrl-C, a replica removed): new requests get 503 and those in flight get this "
        "long to finish.", default=20.0)

    def validate(self, path: str) -> None:
        check_range(f"{path}.port", self.port, 1, 65535)
        for name in ("num_replicas", "min_replicas", "max_batch_size", "max_ongoing_requests", "max_input_tokens",
                     "max_candidates", "default_max_new_tokens", "max_new_tokens_limit", "max_beams",
                     "max_request_bytes", "ingress_replicas", "score_token_budget"):
            check_min(f"{path}.{name}", getattr(self, name), 1)
        check_min(f"{path}.max_queued_requests", self.max_queued_requests, -1)
        check_min(f"{path}.no_repeat_ngram_size", self.no_repeat_ngram_size, 0)
        check_min(f"{path}.max_candidate_tokens", self.max_candidate_tokens, 3)
        check_min(f"{path}.drain_timeout_s", self.drain_timeout_s, 0)
        check_min(f"{path}.max_stop_chars", self.max_stop_chars, 1)
        check_min(f"{path}.request_timeout_s", self.request_timeout_s, 1)
        if self.body_timeout_s <= 0:
            raise ConfigError(f"{path}.body_timeout_s: must be > 0 (got {self.body_timeout_s})")
        if self.max_replicas < self.min_replicas:
            raise ConfigError(f"{path}.max_replicas: {self.max_replicas} < min_replicas {self.min_replicas}")
        if self.default_max_new_tokens > self.max_new_tokens_limit:
            raise ConfigError(f"{path}.default_max_new_tokens: above max_new_tokens_limit {self.max_new_tokens_limit}")
