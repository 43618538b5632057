"""A fake gateway for tests of code that uses the client: no model, no Triton, deterministic jets.

:class:`FakeGateway` answers ``/v1/detect`` (jets derived from the event's content, so the same event always
gets the same jets), ``/healthz``, ``/readyz``, ``/v1/models`` and ``/metrics`` the way the real gateway does,
with knobs for failures. Use it as an httpx transport (``Client(transport=fake.transport())``) or as a real
HTTP server on a free local port (``with fake.serve() as url: ...``), e.g. for the command line.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

LABELS = ("t", "V", "H")


def fake_jets(event: dict[str, Any]) -> list[dict[str, Any]]:
    """0–3 jets, a pure function of the event's JSON (sorted by score, like the gateway's)."""
    digest = hashlib.sha256(json.dumps(event, sort_keys=True).encode()).digest()
    n = digest[0] % 4
    jets = [{"label": LABELS[digest[1 + k] % 3], "score": round(0.01 + digest[5 + k] / 260.0, 6),
             "eta": round((digest[9 + k] - 128) / 60.0, 5), "phi": round((digest[13 + k] - 128) / 41.0, 5),
             "pt": round(200.0 + 4.0 * digest[17 + k], 3)} for k in range(n)]
    return sorted(jets, key=lambda j: -j["score"])


@dataclass
class FakeGateway:
    """The gateway's API on canned answers.

    Attributes:
        model, model_version, backend: what responses say served them.
        fail: called with the 1-based number of each /v1/detect request; returns None to answer normally, or
            ``(status, code, headers)`` to answer that error instead.
        delay_s: seconds each /v1/detect waits before answering.
        requests: every /v1/detect body received (parsed), in arrival order.
    """

    model: str = "twn"
    model_version: int = 1
    backend: str = "triton"
    fail: Callable[[int], tuple[int, str, dict[str, str]] | None] | None = None
    delay_s: float = 0.0
    requests: list[dict[str, Any]] = field(default_factory=list)
    connections: set[tuple[str, int]] = field(default_factory=set)
    """Client (host, port) pairs seen by :meth:`serve`: one per TCP connection."""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _detect_count: int = 0
    _events: int = 0
    _status: dict[str, int] = field(default_factory=dict)

    # -- the API -------------------------------------------------------------------------------------

    def answer(self, method: str, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        """(status, headers, body) for one request."""
        if path == "/healthz":
            return self._json(200, {"status": "ok"})
        if path == "/readyz":
            return self._json(200, {"ready": True, "backend": self.backend, "model": self.model, "detail": None})
        if path == "/v1/models":
            return self._json(200, {"default_backend": self.backend, "default_model": self.model, "models": [
                {"name": self.model, "version": self.model_version, "versions": [self.model_version],
                 "description": None, "metrics": {}, "backends": {}}]})
        if path == "/metrics":
            return 200, {"content-type": "text/plain; version=0.0.4"}, self.metrics_text().encode()
        if path != "/v1/detect":
            return self._error(404, "not_found", f"no route {path}")
        if method != "POST":
            return self._error(405, "method_not_allowed", "use POST")
        with self._lock:
            self._detect_count += 1
            number = self._detect_count
        if self.delay_s:
            time.sleep(self.delay_s)
        failure = self.fail(number) if self.fail is not None else None
        if failure is not None:
            status, code, headers = failure
            return self._error(status, code, f"fake failure of request {number}", headers=headers)
        try:
            payload = json.loads(body)
        except ValueError:
            return self._error(400, "invalid_json", "request body is not valid JSON")
        events = payload.get("events") if isinstance(payload, dict) else None
        if not isinstance(events, list) or not events:
            return self._error(422, "invalid_input", "events must be a non-empty list", field="events")
        with self._lock:
            self.requests.append(payload)
            self._events += len(events)
        out = [{"id": e.get("id") if e.get("id") is not None else str(k), "jets": fake_jets(e),
                "timing_ms": {"parse": 0.1, "rasterize": 0.1, "infer": 1.0, "postprocess": 0.1, "total": 1.3}}
               for k, e in enumerate(events)]
        return self._json(200, {"backend": payload.get("backend") or self.backend,
                                "model": payload.get("model") or self.model, "model_version": self.model_version,
                                "fallback_from": None, "events": out})

    def _json(self, status: int, data: Any, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str],
                                                                                             bytes]:
        with self._lock:
            self._status[str(status)] = self._status.get(str(status), 0) + 1
        return status, {"content-type": "application/json", **(headers or {})}, json.dumps(data).encode()

    def _error(self, status: int, code: str, message: str, field: str | None = None,
               headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        return self._json(status, {"error": {"code": code, "field": field, "message": message}}, headers)

    @property
    def detect_requests(self) -> int:
        """/v1/detect requests received (failed ones included)."""
        return self._detect_count

    def metrics_text(self) -> str:
        """Prometheus text with the gateway's metric names (a few series)."""
        n = len(self.requests)
        lines = ["# TYPE jetssd_gateway_requests_total counter"]
        lines += [f'jetssd_gateway_requests_total{{endpoint="/v1/detect",method="POST",status="{s}"}} {c}'
                  for s, c in sorted(self._status.items())]
        lines += ["# TYPE jetssd_gateway_request_duration_seconds histogram"]
        labels = f'endpoint="/v1/detect",backend="{self.backend}",model="{self.model}"'
        for le, share in (("0.005", 0.5), ("0.01", 0.9), ("0.05", 1.0), ("+Inf", 1.0)):
            lines.append(f'jetssd_gateway_request_duration_seconds_bucket{{{labels},le="{le}"}} {share * n}')
        lines += [f"jetssd_gateway_request_duration_seconds_count{{{labels}}} {n}",
                  f"jetssd_gateway_request_duration_seconds_sum{{{labels}}} {0.006 * n}",
                  "# TYPE jetssd_gateway_events_total counter",
                  f'jetssd_gateway_events_total{{backend="{self.backend}",model="{self.model}"}} {self._events}',
                  "# TYPE jetssd_gateway_in_flight_requests gauge", "jetssd_gateway_in_flight_requests 1.0"]
        return "\n".join(lines) + "\n"

    # -- as a transport / a server -------------------------------------------------------------------

    def _handle(self, request: httpx.Request) -> httpx.Response:
        status, headers, body = self.answer(request.method, request.url.path, request.read())
        return httpx.Response(status, headers=headers, content=body)

    def transport(self) -> httpx.MockTransport:
        """An httpx transport answering like the gateway (for :class:`~jetssd_client.Client`)."""
        return httpx.MockTransport(self._handle)

    def async_transport(self) -> httpx.MockTransport:
        """The same for :class:`~jetssd_client.AsyncClient` (MockTransport serves both)."""
        return httpx.MockTransport(self._handle)

    @contextlib.contextmanager
    def serve(self, port: int = 0) -> Iterator[str]:
        """Serve on ``127.0.0.1:port`` (0: a free port) in a thread; yields the base URL."""
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _reply(self) -> None:
                fake.connections.add(self.client_address[:2])
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                status, headers, data = fake.answer(self.command, self.path.split("?")[0], body)
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _reply  # noqa: N815

            def log_message(self, format: str, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        server.daemon_threads = True
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}"
        finally:
            server.shutdown()
            server.server_close()
