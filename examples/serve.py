"""A small inference server that loads its model from a juice:// URL when it starts.

    python examples/serve.py --demo                    # make a demo volume and model, then serve it
    python examples/serve.py juice://vol/models/tiny.safetensors --port 8000

    curl localhost:8000/health
    curl -d '{"inputs": [[0.1, 0.2, ...16 numbers]]}' localhost:8000/predict
    curl 'localhost:8000/predict?x=0.1,0.2,...'

The model is a two-layer MLP (``fc1.weight`` [hidden, in], ``fc1.bias``, ``fc2.weight`` [out, hidden],
``fc2.bias``); its sizes come from the tensors. Loading is ``tj.load_safetensors`` -- run
``torchjuice warmup juice://vol/models/...`` first so that a fresh machine starts from its local
disk cache. ``/health`` reports how long the load took.

GET  /health    {"status": "ok", "model": URL, "load_seconds": s, "tensors": n, "bytes": b, ...}
POST /predict   {"inputs": [[...], ...]}  ->  {"outputs": [[...], ...]}
GET  /predict?x=a,b,c,...                 ->  {"outputs": [[...]]}
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import torch

import torchjuice as tj

DEMO_PATH = "/models/tiny.safetensors"


class TinyMLP(torch.nn.Module):
    def __init__(self, state: dict[str, torch.Tensor]):
        super().__init__()
        hidden, n_in = state["fc1.weight"].shape
        n_out = state["fc2.weight"].shape[0]
        self.fc1 = torch.nn.Linear(n_in, hidden)
        self.fc2 = torch.nn.Linear(hidden, n_out)
        self.load_state_dict(state, assign=True)     # use the loaded tensors as they are
        self.eval()

    @property
    def in_features(self) -> int:
        return self.fc1.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


def make_demo(volume: str, n_in: int = 16, hidden: int = 64, n_out: int = 4) -> str:
    """An embedded volume holding a random (seeded) tiny model; returns its juice:// URL."""
    try:
        tj.connect(volume).close()
    except tj.NotFormattedError:
        tj.format(None, volume)
    g = torch.Generator().manual_seed(0)
    state = {"fc1.weight": torch.randn(hidden, n_in, generator=g) / n_in ** 0.5,
             "fc1.bias": torch.zeros(hidden),
             "fc2.weight": torch.randn(n_out, hidden, generator=g) / hidden ** 0.5,
             "fc2.bias": torch.zeros(n_out)}
    with tj.connect(volume) as vol:
        vol.makedirs("/models", exist_ok=True)
    url = f"juice://{volume}{DEMO_PATH}"
    tj.save_safetensors(state, url, metadata={"architecture": "tiny-mlp"})
    return url


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, addr, model: TinyMLP, info: dict):
        super().__init__(addr, Handler)
        self.model = model
        self.info = info


class Handler(BaseHTTPRequestHandler):
    server: Server

    def log_message(self, fmt, *args):        # one short line per request on stderr
        sys.stderr.write(f"{self.command} {self.path} -> {args[1] if len(args) > 1 else ''}\n")

    def _send(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _predict(self, inputs) -> None:
        try:
            x = torch.tensor(inputs, dtype=torch.float32)
            if x.ndim == 1:
                x = x.unsqueeze(0)
            if x.ndim != 2 or x.shape[1] != self.server.model.in_features:
                raise ValueError(f"inputs must be rows of {self.server.model.in_features} numbers")
        except (TypeError, ValueError) as e:
            return self._send(400, {"error": str(e)})
        with torch.inference_mode():
            y = self.server.model(x)
        self._send(200, {"outputs": y.tolist()})

    def do_GET(self):
        url = urlparse(self.path)
        if url.path == "/health":
            return self._send(200, {"status": "ok", **self.server.info})
        if url.path == "/predict":
            xs = parse_qs(url.query).get("x")
            if not xs:
                return self._send(400, {"error": "give ?x=a,b,c,..."})
            try:
                row = [float(v) for v in xs[0].split(",")]
            except ValueError:
                return self._send(400, {"error": "x must be comma-separated numbers"})
            return self._predict([row])
        self._send(404, {"error": f"no route {url.path}"})

    def do_POST(self):
        if urlparse(self.path).path != "/predict":
            return self._send(404, {"error": f"no route {self.path}"})
        try:
            n = int(self.headers.get("Content-Length", 0))
            body = json.loads(self.rfile.read(n) or b"{}")
            inputs = body["inputs"]
        except (ValueError, KeyError, TypeError):
            return self._send(400, {"error": 'send JSON {"inputs": [[...], ...]}'})
        self._predict(inputs)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Serve a tiny model loaded from a juice:// URL.")
    ap.add_argument("model", nargs="?", help="juice://VOL/path/model.safetensors (or a sharded dir)")
    ap.add_argument("--demo", action="store_true",
                    help="format an embedded volume (if needed) with a random tiny model, serve it")
    ap.add_argument("--demo-volume", default="demo")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000, help="0: any free port")
    a = ap.parse_args(argv)
    if not a.model and not a.demo:
        ap.error("give a juice:// URL, or --demo")
    url = make_demo(a.demo_volume) if a.demo and not a.model else a.model

    t = time.perf_counter()
    state = tj.load_safetensors(url)
    load_s = time.perf_counter() - t
    model = TinyMLP(state)
    info = {"model": url, "load_seconds": round(load_s, 6), "tensors": len(state),
            "bytes": sum(v.numel() * v.element_size() for v in state.values()),
            "in_features": model.in_features}
    print(f"loaded {url}: {info['tensors']} tensors, {info['bytes']} bytes in {load_s * 1000:.1f} ms",
          flush=True)

    server = Server((a.host, a.port), model, info)
    host, port = server.server_address[:2]
    print(f"listening on http://{host}:{port}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
