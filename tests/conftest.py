"""Shared fixtures: real servers on loopback (started once per session, stopped at its end),
a metadata URL and a storage URL for every engine and store."""
from __future__ import annotations

import os

import pytest

from servers import PostgresServer, RedisServer, S3Server, ServerUnavailable

META_ENGINES = ["sqlite", "redis", "postgres"]
STORES = ["file", "s3", "mem"]


def _start(cls):
    try:
        return cls()
    except ServerUnavailable as e:
        if os.environ.get("TORCHJUICE_REQUIRE_SERVERS") == "1":
            pytest.fail(f"{e} (TORCHJUICE_REQUIRE_SERVERS=1)")
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def redis_server():
    srv = _start(RedisServer)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def postgres_server():
    srv = _start(PostgresServer)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def s3_server():
    srv = _start(S3Server)
    yield srv
    srv.stop()


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """Each test has its own volume registry and no inherited engine/cache settings."""
    monkeypatch.setenv("TORCHJUICE_HOME", str(tmp_path / "tjhome"))
    for var in ("TORCHJUICE_META", "TORCHJUICE_CACHE_DIR", "TORCHJUICE_CACHE_SIZE"):
        monkeypatch.delenv(var, raising=False)


def make_meta_url(engine: str, request, tmp_path) -> str:
    if engine == "sqlite":
        return f"sqlite3://{tmp_path}/meta.db"
    if engine == "redis":
        return request.getfixturevalue("redis_server").url()
    if engine == "postgres":
        return request.getfixturevalue("postgres_server").url()
    raise ValueError(engine)


def make_store_url(store: str, request, tmp_path) -> str:
    if store == "file":
        return f"file://{tmp_path}/bucket"
    if store == "s3":
        return request.getfixturevalue("s3_server").url()
    if store == "mem":
        return f"mem://{os.urandom(4).hex()}"
    raise ValueError(store)


@pytest.fixture(params=META_ENGINES)
def meta_url(request, tmp_path):
    """A fresh, empty metadata engine of each kind."""
    return make_meta_url(request.param, request, tmp_path)


@pytest.fixture(params=STORES)
def store_url(request, tmp_path):
    """A fresh, empty object store of each kind."""
    return make_store_url(request.param, request, tmp_path)
