"""A small client of the probe API (used by ``kilm-ray probe``, the demo and the load benchmark)."""

from __future__ import annotations

import os
import time
from typing import Any, Optional

import httpx


class ProbeClient:
    def __init__(self, url: str = "http://127.0.0.1:8000", token: Optional[str] = None, timeout: float = 60.0):
        token = token or os.environ.get("KILM_SERVE_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)

    def wait_until_ready(self, timeout_s: float) -> None:
        """Poll ``/healthz`` until the service answers (it loads the model first), at most ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if self.http.get("/healthz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() >= deadline:
                raise RuntimeError(f"no service answered at {self.http.base_url} within {timeout_s:g} s")
            time.sleep(1.0)

    def post(self, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
        response = self.http.post(f"/v1/{endpoint}", json=body)
        if response.status_code >= 400:
            try:
                detail = response.json().get("error", response.text)
            except ValueError:
                detail = response.text
            raise RuntimeError(f"HTTP {response.status_code}: {detail}")
        return response.json()

    def describe(self, text: str, **options) -> dict[str, Any]:
        return self.post("describe", {"text": text, **options})

    def model(self) -> dict[str, Any]:
        response = self.http.get("/v1/model")
        response.raise_for_status()
        return response.json()
