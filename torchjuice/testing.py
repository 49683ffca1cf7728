"""Real servers on loopback for tests and benchmarks: Redis, PostgreSQL and an S3 endpoint
(moto's server, in its own process).

Each starts on a free port in a temporary directory; ``stop()`` ends it and removes its files.
A missing program raises :class:`ServerUnavailable` (the test suite turns it into a skip, or a
failure under ``TORCHJUICE_REQUIRE_SERVERS=1``).
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request



class ServerUnavailable(RuntimeError):
    """The program a server needs is not installed."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _missing(what: str) -> None:
    raise ServerUnavailable(f"{what} is not installed")


def _wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout}s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class RedisServer:
    def __init__(self):
        exe = shutil.which("redis-server")
        if exe is None:
            _missing("redis-server")
        self.exe = exe
        self.dir = tempfile.mkdtemp(prefix="tj-redis-")
        self.port = free_port()
        self.start()
        self._next_db = 0

    def start(self) -> None:
        """Start the server (again, after :meth:`shutdown`: same port, the data it saved)."""
        self.proc = subprocess.Popen(
            [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir, "--databases", "4096"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(self.port, self.proc, "redis-server")

    def shutdown(self) -> None:
        """Stop the server, saving every database to its directory first (SHUTDOWN SAVE)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
            s.sendall(b"*2\r\n$8\r\nSHUTDOWN\r\n$4\r\nSAVE\r\n")
            try:
                s.recv(1024)                 # the server closes the connection when it is done
            except OSError:
                pass
        self.proc.wait(30)

    def restart(self, downtime: float = 0.0) -> None:
        """Stop the server and start it again on the same port with the same data, after
        ``downtime`` seconds (clients see refused connections meanwhile)."""
        self.shutdown()
        time.sleep(downtime)
        self.start()

    def url(self) -> str:
        """A fresh, empty database on this server."""
        self._next_db += 1
        if self._next_db >= 4096:
            raise RuntimeError("out of redis databases")
        return f"redis://127.0.0.1:{self.port}/{self._next_db}"

    def stop(self) -> None:
        _stop(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


class PostgresServer:
    def __init__(self):
        initdb = shutil.which("initdb")
        pg_ctl = shutil.which("pg_ctl")
        if initdb is None or pg_ctl is None:
            _missing("PostgreSQL (initdb/pg_ctl)")
        self.root = tempfile.mkdtemp(prefix="tj-pg-")
        os.chmod(self.root, 0o777)
        self.data = os.path.join(self.root, "data")
        self.port = free_port()
        self.pg_ctl = pg_ctl
        as_root = os.geteuid() == 0
        self._prefix = ["su", "postgres", "-s", "/bin/bash", "-c"] if as_root else None
        self._run(f"{initdb} -D {self.data} -A trust -U postgres --no-sync -E UTF8 >/dev/null")
        opts = (f"-p {self.port} -h 127.0.0.1 -k {self.root} -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        self._run(f"{pg_ctl} -D {self.data} -o '{opts}' -l {self.root}/log -w -t 60 start >/dev/null")
        self.user = "postgres"
        self._n = 0
        import psycopg
        self._admin = psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres",
                                      autocommit=True)

    def _run(self, cmd: str) -> None:
        argv = self._prefix + [cmd] if self._prefix else ["bash", "-c", cmd]
        subprocess.run(argv, check=True)

    def url(self) -> str:
        """A fresh, empty database on this server."""
        self._n += 1
        name = f"tj{self._n}"
        self._admin.execute(f"CREATE DATABASE {name}")
        return f"postgres://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        try:
            self._admin.close()
        finally:
            self._run(f"{self.pg_ctl} -D {self.data} -m immediate -w stop >/dev/null 2>&1 || true")
            shutil.rmtree(self.root, ignore_errors=True)


class S3Server:
    """moto's S3 server in its own process (so it does not share our GIL)."""

    def __init__(self):
        try:
            import moto.server  # noqa: F401
        except ImportError:
            _missing("moto[server]")
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(self.port, self.proc, "moto server")
        for k, v in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                     ("AWS_DEFAULT_REGION", "us-east-1")):
            os.environ.setdefault(k, v)
        self._n = 0

    def url(self, prefix: str = "") -> str:
        """A URL for a fresh bucket (created by the store's ``create()``)."""
        self._n += 1
        bucket = f"tj-bucket-{self._n}"
        tail = f"/{prefix}" if prefix else ""
        return f"s3://{bucket}{tail}?endpoint={self.endpoint}&region=us-east-1"

    def reset(self) -> None:
        urllib.request.urlopen(urllib.request.Request(f"{self.endpoint}/moto-api/reset",
                                                      method="POST")).read()

    def stop(self) -> None:
        _stop(self.proc)
