"""A real HTTP server on 127.0.0.1 that answers like EC2's instance metadata service (IMDSv2) for the
paths the spot watcher reads: a session token from PUT /latest/api/token (with the TTL header), then
GET .../spot/instance-action and .../events/recommendations/rebalance with the token (401 without;
404 until a notice is posted). ``fail`` makes the next answers a 500; ``delay_s`` makes them slow."""

from __future__ import annotations

import json
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional


class FakeImds:
    def __init__(self):
        self.action: Optional[dict] = None
        self.rebalance: Optional[dict] = None
        self.fail = 0  # answer this many requests with HTTP 500
        self.delay_s = 0.0
        self.tokens: set[str] = set()
        self.requests: list[str] = []
        imds = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _answer(self, status: int, body: str = "") -> None:
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _gate(self) -> bool:
                imds.requests.append(f"{self.command} {self.path}")
                if imds.delay_s:
                    time.sleep(imds.delay_s)
                if imds.fail:
                    imds.fail -= 1
                    self._answer(500, "internal error")
                    return False
                return True

            def do_PUT(self):
                if not self._gate():
                    return
                if self.path != "/latest/api/token" or not self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                    return self._answer(400)
                token = secrets.token_hex(16)
                imds.tokens.add(token)
                self._answer(200, token)

            def do_GET(self):
                if not self._gate():
                    return
                if self.headers.get("X-aws-ec2-metadata-token") not in imds.tokens:
                    return self._answer(401)
                body = {"/latest/meta-data/spot/instance-action": imds.action,
                        "/latest/meta-data/events/recommendations/rebalance": imds.rebalance}.get(self.path)
                self._answer(200, json.dumps(body)) if body is not None else self._answer(404)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def notice(self, seconds_from_now: float, action: str = "terminate") -> None:
        at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + seconds_from_now))
        self.action = {"action": action, "time": at}

    def __enter__(self) -> "FakeImds":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
