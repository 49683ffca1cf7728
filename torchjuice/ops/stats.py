"""The counters of a volume's clients in the Prometheus text format
(``torchjuice stats META_URL --prometheus HOST:PORT`` serves them at ``/metrics``).

Every client publishes its counters with its session heartbeat; one scrape reads the sessions
once. Each numeric counter ``k`` becomes the metric ``torchjuice_k`` with one sample per session
(labels ``volume``, ``session``, ``host``, ``pid``) and one summed over the sessions (label
``volume`` only); volume-wide gauges (used bytes, inodes, live sessions) come with them.
"""
from __future__ import annotations

import re
from http.server import BaseHTTPRequestHandler, HTTPServer

_BAD = re.compile(r"[^a-zA-Z0-9_]")


def _label(v) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def prometheus_text(volume: str, sessions: list[dict], used_bytes: int, inodes: int) -> str:
    vol = _label(volume)
    lines = [
        "# HELP torchjuice_used_bytes Space used by the files of the volume.",
        "# TYPE torchjuice_used_bytes gauge",
        f'torchjuice_used_bytes{{volume="{vol}"}} {used_bytes}',
        "# HELP torchjuice_inodes Inodes in the volume.",
        "# TYPE torchjuice_inodes gauge",
        f'torchjuice_inodes{{volume="{vol}"}} {inodes}',
        "# HELP torchjuice_sessions Clients with a live session.",
        "# TYPE torchjuice_sessions gauge",
        f'torchjuice_sessions{{volume="{vol}"}} {len(sessions)}',
    ]
    names: dict[str, None] = {}
    for s in sessions:
        for k, v in (s.get("stats") or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                names[k] = None
    for k in sorted(names):
        metric = "torchjuice_" + _BAD.sub("_", k)
        kind = "gauge" if k.endswith(("_usage_bytes", "buffer_bytes")) else "counter"
        lines.append(f"# TYPE {metric} {kind}")
        total = 0
        for s in sessions:
            v = (s.get("stats") or {}).get(k)
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            total += v
            lines.append(f'{metric}{{volume="{vol}",session="{s["sid"]}",'
                         f'host="{_label(s.get("host", ""))}",pid="{_label(s.get("pid", ""))}"}} '
                         f"{v}")
        lines.append(f'{metric}{{volume="{vol}"}} {total}')
    return "\n".join(lines) + "\n"


def metrics_server(meta, address: str) -> HTTPServer:
    """An HTTP server (not started) answering ``GET /metrics`` for the volume of ``meta`` (a
    loaded engine). ``address`` is ``HOST:PORT`` (port 0: any free port). One thread serves the
    requests in turn (a scrape is one engine round trip): engines keep a connection per thread."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"invalid address {address!r}: use HOST:PORT, e.g. 127.0.0.1:9567")
    name = meta.load().name

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            if self.path.split("?")[0] not in ("/metrics", "/"):
                self.send_error(404)
                return
            try:
                used, inodes = meta.statfs()
                body = prometheus_text(name, meta.list_sessions(), used, inodes).encode()
            except Exception as e:
                self.send_error(503, str(e).splitlines()[0] if str(e) else type(e).__name__)
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):           # quiet: a scrape every few seconds
            pass

    return HTTPServer((host.strip("[]"), int(port)), Handler)


__all__ = ["prometheus_text", "metrics_server"]
