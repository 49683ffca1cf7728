"""Conformance suite for the object stores (file, s3 on a real moto server, mem), plus the
store-specific behaviour: atomic file puts, S3 retries and dead endpoints, fault injection."""
from __future__ import annotations

import errno
import http.client
import os
import pickle
import random
import signal
import threading
import time
import traceback
import urllib.parse

import pytest

from servers import free_port
from torchjuice.errors import InvalidURLError
from torchjuice.object import ObjectInfo, ObjectStore, create_store
from torchjuice.object.fault import (FaultyStore, InjectedConnectionError, InjectedFault,
                                     InjectedThrottle)
from torchjuice.object.file import TEMP_PREFIX, FileStore, InvalidKeyError
from torchjuice.object.mem import MemStore
from torchjuice.object.s3 import S3Store


@pytest.fixture
def store(store_url):
    s = create_store(store_url)
    s.create()
    yield s
    s.close()


def _blob(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


# ---------------------------------------------------------------- conformance (every store)

def test_create_idempotent(store):
    store.create()
    store.create()
    store.put("k", b"v")
    store.create()
    assert store.get("k") == b"v"


def test_put_get_roundtrip(store):
    big = _blob(5 << 20, 1)
    store.put("empty", b"")
    store.put("small", b"hello")
    store.put("big", big)
    store.put("ba", bytearray(b"from a bytearray"))
    store.put("mv", memoryview(b"xxfrom a viewxx")[2:-2])
    assert store.get("empty") == b""
    assert store.get("small") == b"hello"
    got = store.get("big")
    assert isinstance(got, bytes) and got == big
    assert store.get("ba") == b"from a bytearray"
    assert store.get("mv") == b"from a view"
    assert store.head("big").size == 5 << 20
    assert store.head("empty").size == 0


def test_file_store_put_pieces_stores_their_concatenation(tmp_path):
    store = create_store(f"file://{tmp_path}/st")
    pieces = [_blob(1 << 20, 2), memoryview(_blob(300_000, 3))[7:], b"", bytearray(b"tail")]
    store.put_pieces("joined", pieces)
    assert store.get("joined") == b"".join(bytes(p) for p in pieces)
    store.put_pieces("none", [])
    assert store.get("none") == b""
    assert not [n for n in os.listdir(tmp_path / "st") if n.startswith(TEMP_PREFIX)]


def test_file_store_put_pieces_resumes_short_writes(tmp_path, monkeypatch):
    """writev may write less than asked (a signal, a full pipe of a FUSE device...): the rest is
    written, from the right byte of the right piece."""
    from torchjuice.object import file as file_store
    s = create_store(f"file://{tmp_path}/st")
    real = os.writev
    calls = []

    def short(fd, bufs):
        bufs = list(bufs)
        calls.append(len(bufs))
        total = sum(len(b) for b in bufs)
        return real(fd, [memoryview(b"".join(bytes(b) for b in bufs))[:max(1, total // 3)]])
    monkeypatch.setattr(file_store.os, "writev", short)
    pieces = [_blob(100_000, 4), _blob(5, 5), _blob(70_000, 6)]
    s.put_pieces("k", pieces)
    assert len(calls) > 3
    assert s.get("k") == b"".join(pieces)


def test_ranged_get(store):
    data = _blob(100_000, 2)
    store.put("r", data)
    assert store.get("r", 0, 10) == data[:10]
    assert store.get("r", 10) == data[10:]
    assert store.get("r", 500, 1000) == data[500:1500]
    assert store.get("r", 99_990, 100) == data[99_990:]        # short at the end
    assert store.get("r", 99_999, 1) == data[-1:]
    assert store.get("r", 100_000) == b""                       # at the end
    assert store.get("r", 200_000, 10) == b""                   # past the end
    assert store.get("r", 5, 0) == b""
    store.put("e", b"")
    assert store.get("e", 0, 10) == b""


def test_get_into(store):
    data = _blob(300_000, 3)
    store.put("g", data)
    buf = bytearray(100_000)
    assert store.get_into("g", memoryview(buf)) == 100_000
    assert bytes(buf) == data[:100_000]
    assert store.get_into("g", memoryview(buf), 250_000) == 50_000   # short at the end
    assert bytes(buf[:50_000]) == data[250_000:]
    assert store.get_into("g", memoryview(buf)[10:20], 7) == 10
    assert bytes(buf[10:20]) == data[7:17]
    assert store.get_into("g", memoryview(buf), 300_000) == 0
    assert store.get_into("g", memoryview(buf), 999_999) == 0
    whole = bytearray(300_000)
    assert store.get_into("g", memoryview(whole)) == 300_000 and whole == data
    store.put("e", b"")
    assert store.get_into("e", memoryview(buf)) == 0


def test_head(store):
    before = time.time()
    store.put("h/x", b"12345")
    info = store.head("h/x")
    assert isinstance(info, ObjectInfo)
    assert info.key == "h/x" and info.size == 5
    assert abs(info.mtime - before) < 120


def test_missing_key(store):
    for call in (lambda: store.get("nope"), lambda: store.get("nope", 5, 5),
                 lambda: store.head("nope"), lambda: store.head("dir/nope"),
                 lambda: store.get_into("nope", memoryview(bytearray(10)))):
        with pytest.raises(FileNotFoundError) as ei:
            call()
        assert ei.value.errno == errno.ENOENT


def test_delete_idempotent(store):
    store.put("d/1", b"x")
    store.delete("d/1")
    store.delete("d/1")
    store.delete("never/was")
    with pytest.raises(FileNotFoundError):
        store.get("d/1")
    assert [o.key for o in store.list("d/")] == []


def test_overwrite_replaces(store):
    store.put("o", b"first version, long")
    store.put("o", b"second")
    assert store.get("o") == b"second"
    assert store.head("o").size == 6
    assert [(o.key, o.size) for o in store.list("o")] == [("o", 6)]


def test_list_prefix_in_key_order(store):
    keys = ["x/1", "x-1", "x/2/3", "x0", "y", "x/10", "x/2/4", "w/deep/er/key", "x/2a"]
    for k in keys:
        store.put(k, k.encode())
    listed = list(store.list())
    assert [o.key for o in listed] == sorted(keys)
    assert all(o.size == len(o.key) for o in listed)
    assert [o.key for o in store.list("x/")] == ["x/1", "x/10", "x/2/3", "x/2/4", "x/2a"]
    assert [o.key for o in store.list("x")] == sorted(k for k in keys if k.startswith("x"))
    assert [o.key for o in store.list("x/2")] == ["x/2/3", "x/2/4", "x/2a"]
    assert [o.key for o in store.list("x/2/")] == ["x/2/3", "x/2/4"]
    assert [o.key for o in store.list("w/deep/er/k")] == ["w/deep/er/key"]
    assert list(store.list("nothing")) == []
    assert list(store.list("nothing/at/all/")) == []


def test_list_pagination(store):
    n = 1100
    keys = [f"p/{i:05d}" for i in range(n)]

    def put_some(part):
        for k in part:
            store.put(k, b"x")

    threads = [threading.Thread(target=put_some, args=(keys[i::8],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store.put("q", b"")
    got = [o.key for o in store.list("p/")]
    assert got == keys
    assert len(list(store.list())) == n + 1
    assert [o.key for o in store.list("p/0100")] == [f"p/{i:05d}" for i in range(1000, 1010)]


def test_concurrent_threads(store):
    errors = []
    shared = _blob(200_000, 4)
    store.put("shared", shared)

    def work(t):
        try:
            rnd = random.Random(t)
            for i in range(15):
                data = rnd.randbytes(rnd.randrange(1, 50_000))
                key = f"t{t}/{i}"
                store.put(key, data)
                assert store.get(key) == data
                buf = bytearray(1000)
                off = rnd.randrange(0, 199_000)
                assert store.get_into("shared", memoryview(buf), off) == 1000
                assert buf == shared[off:off + 1000]
        except BaseException as e:   # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(list(store.list("t"))) == 8 * 15


def _wait_child(pid: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError("forked child hung")


def test_forked_child(store):
    store.put("parent", b"p" * 1000)
    assert store.get("parent") == b"p" * 1000      # connections exist before the fork
    parent_client = store._client() if isinstance(store, S3Store) else None
    pid = os.fork()
    if pid == 0:   # child
        code = 1
        try:
            assert store.get("parent") == b"p" * 1000
            store.put("child", b"c" * 10)
            assert store.get("child") == b"c" * 10
            buf = bytearray(5)
            assert store.get_into("parent", memoryview(buf), 995) == 5
            if parent_client is not None:
                assert store._client() is not parent_client
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    assert _wait_child(pid) == 0
    assert store.get("parent") == b"p" * 1000      # the parent's connections still work
    if not isinstance(store, MemStore):            # a forked mem store is a private copy
        assert store.get("child") == b"c" * 10
    if parent_client is not None:
        assert store._client() is parent_client


def test_pickle_roundtrip(store):
    store.put("pk", b"pickled")
    clone = pickle.loads(pickle.dumps(store))
    assert type(clone) is type(store) and clone.url == store.url
    assert clone.get("pk") == b"pickled"
    clone.close()


def test_repr(store):
    assert store.url in repr(store)


# ---------------------------------------------------------------- URLs and keys

@pytest.mark.parametrize("url", ["ftp://x/y", "nothing", "", "gs://bucket", "s4://b"])
def test_unknown_scheme(url):
    with pytest.raises(InvalidURLError) as ei:
        create_store(url)
    assert isinstance(ei.value, ValueError) and isinstance(ei.value, OSError)
    assert ei.value.errno == errno.EINVAL


@pytest.mark.parametrize("url", ["file://relative/dir", "s3://", "s3://b?endpoint=host:9000",
                                 "s3://bkt?endpont=http://x:1"])
def test_bad_urls(url):
    with pytest.raises(InvalidURLError):
        create_store(url)


def test_store_types(tmp_path):
    assert isinstance(create_store(f"file://{tmp_path}/d"), FileStore)
    assert isinstance(create_store("s3://bkt/pre?endpoint=http://127.0.0.1:1&region=eu-west-1"), S3Store)
    assert isinstance(create_store("mem://n"), MemStore)
    s3 = create_store("s3://bkt/a/b/?endpoint=http://127.0.0.1:1&region=eu-west-1")
    assert (s3.bucket, s3.prefix, s3.endpoint, s3.region) == ("bkt", "a/b", "http://127.0.0.1:1", "eu-west-1")


@pytest.mark.parametrize("key", ["../x", "a/../../x", "/abs", "a/./b", "a//b", "", "a/", "..", "a/.."])
def test_bad_keys_rejected(store, key):
    with pytest.raises(InvalidKeyError) as ei:
        store.put(key, b"x")
    assert isinstance(ei.value, ValueError) and ei.value.errno == errno.EINVAL
    with pytest.raises(InvalidKeyError):
        store.get(key)


def test_file_store_stays_inside(tmp_path):
    s = FileStore(f"file://{tmp_path}/root")
    s.create()
    for key in ("../escape", "a/../../escape", "/tmp/escape"):
        with pytest.raises(InvalidKeyError):
            s.put(key, b"x")
    assert not (tmp_path / "escape").exists()
    assert sorted(os.listdir(tmp_path)) == ["root"]
    assert list(s.list("../")) == []


def test_mem_stores_share_by_name():
    a, b, c = MemStore("mem://shared-name"), create_store("mem://shared-name"), MemStore("mem://other")
    a.put("k", b"v")
    assert b.get("k") == b"v"
    with pytest.raises(FileNotFoundError):
        c.get("k")


# ---------------------------------------------------------------- file store specifics

def test_file_store_put_creates_dirs_without_create(tmp_path):
    s = FileStore(f"file://{tmp_path}/nocreate")
    assert list(s.list()) == []
    s.put("a/b/c/d", b"deep")
    assert (tmp_path / "nocreate/a/b/c/d").read_bytes() == b"deep"


def test_file_store_put_is_atomic(tmp_path):
    s = FileStore(f"file://{tmp_path}/atomic")
    s.create()
    versions = [b"a" * (1 << 20), b"b" * (2 << 20), b"c" * 3]
    s.put("obj", versions[0])
    stop = threading.Event()
    errors = []

    def writer():
        i = 0
        while not stop.is_set():
            i += 1
            s.put("obj", versions[i % 3])

    def reader():
        buf = bytearray(3 << 20)
        while not stop.is_set():
            try:
                data = s.get("obj")
                assert data in versions, len(data)
                n = s.get_into("obj", memoryview(buf))
                assert bytes(buf[:n]) in versions, n
                keys = [o.key for o in s.list()]
                assert keys == ["obj"], keys
            except BaseException as e:
                errors.append(e)
                return

    threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
    for t in threads:
        t.start()
    time.sleep(0.7)
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert [p for p in os.listdir(tmp_path / "atomic") if p.startswith(TEMP_PREFIX)] == []


def test_file_store_ignores_temp_files(tmp_path):
    s = FileStore(f"file://{tmp_path}/tmpfiles")
    s.put("d/real", b"1")
    (tmp_path / "tmpfiles/d" / (TEMP_PREFIX + "abc")).write_bytes(b"partial")
    (tmp_path / "tmpfiles" / (TEMP_PREFIX + "def")).write_bytes(b"partial")
    assert [o.key for o in s.list()] == ["d/real"]
    with pytest.raises(InvalidKeyError):
        s.put("d/" + TEMP_PREFIX + "abc", b"x")


# ---------------------------------------------------------------- S3 specifics

def test_s3_dead_endpoint_raises_connection_error(monkeypatch):
    for k, v in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing")):
        monkeypatch.setenv(k, v)
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    s = S3Store(f"s3://dead-bucket?endpoint={endpoint}&region=us-east-1")
    for call in (lambda: s.put("k", b"x"), lambda: s.get("k"), s.create, lambda: list(s.list())):
        t0 = time.monotonic()
        with pytest.raises(ConnectionError) as ei:
            call()
        assert time.monotonic() - t0 < 15
        assert endpoint in str(ei.value)
    s.close()


def _slowdown(op: str):
    from botocore.exceptions import ClientError
    return ClientError({"Error": {"Code": "SlowDown", "Message": "Please reduce your request rate."},
                        "ResponseMetadata": {"HTTPStatusCode": 503}}, op)


def test_s3_retries_throttling(s3_server, monkeypatch):
    s = S3Store(s3_server.url())
    s.light_get = False               # the botocore path (the light one falls back to it)
    s.create()
    s.backoff_base = 0.001
    client = s._client()
    real_put, real_get = client.put_object, client.get_object
    calls = {"put": 0, "get": 0}

    def flaky_put(**kw):
        calls["put"] += 1
        if calls["put"] <= 2:
            raise _slowdown("PutObject")
        return real_put(**kw)

    def flaky_get(**kw):
        calls["get"] += 1
        if calls["get"] <= 2:
            from botocore.exceptions import ClientError
            raise ClientError({"Error": {"Code": "InternalError", "Message": "oops"},
                               "ResponseMetadata": {"HTTPStatusCode": 500}}, "GetObject")
        return real_get(**kw)

    monkeypatch.setattr(client, "put_object", flaky_put)
    monkeypatch.setattr(client, "get_object", flaky_get)
    s.put("k", b"value")
    assert calls["put"] == 3
    assert s.get("k") == b"value"
    assert calls["get"] == 3


def test_s3_retry_gives_up(s3_server, monkeypatch):
    s = S3Store(s3_server.url())
    s.create()
    s.backoff_base = 0.001
    s.max_attempts = 4
    client = s._client()
    calls = []

    def always(**kw):
        calls.append(1)
        raise _slowdown("PutObject")

    monkeypatch.setattr(client, "put_object", always)
    with pytest.raises(OSError) as ei:
        s.put("k", b"v")
    assert len(calls) == 4
    assert "SlowDown" in str(ei.value)
    assert not isinstance(ei.value, FileNotFoundError)


def test_s3_retries_dropped_connection(s3_server):
    from botocore.exceptions import ConnectionClosedError
    s = S3Store(s3_server.url())
    s.light_get = False               # the botocore path (the light one falls back to it)
    s.create()
    s.backoff_base = 0.001
    s.put("k", b"abc" * 1000)
    fails = [2]

    def boom(request, **kw):
        if fails[0] > 0:
            fails[0] -= 1
            raise ConnectionClosedError(endpoint_url=request.url)

    s._client().meta.events.register("before-send.s3.GetObject", boom)
    assert s.get("k") == b"abc" * 1000
    assert fails[0] == 0


def test_s3_get_into_resumes_broken_body(s3_server, monkeypatch):
    import io
    s = S3Store(s3_server.url())
    s.light_get = False               # the botocore path (the light one falls back to it)
    s.create()
    s.backoff_base = 0.001
    data = _blob(50_000, 5)
    s.put("k", data)
    client = s._client()
    real_get = client.get_object
    ranges = []

    class Truncated:
        def __init__(self, body, keep):
            self._bio = io.BytesIO(body.read()[:keep])
            body.close()

        def read(self, amt=None):
            return self._bio.read(amt)

        def close(self):
            pass

    def get(**kw):
        ranges.append(kw.get("Range"))
        resp = real_get(**kw)
        if len(ranges) == 1:
            resp["Body"] = Truncated(resp["Body"], 10_000)
        return resp

    monkeypatch.setattr(client, "get_object", get)
    buf = bytearray(40_000)
    assert s.get_into("k", memoryview(buf), 5_000) == 40_000
    assert buf == data[5_000:45_000]
    assert ranges == ["bytes=5000-44999", "bytes=15000-44999"]


def test_s3_light_get_signature_is_botocores(monkeypatch):
    """The light GET path signs exactly as botocore's S3SigV4Auth does (static keys, a session
    token, keys from the environment), and quotes keys as botocore's serializer does."""
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials
    from botocore.utils import percent_encode

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDENV")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env/secret+key")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    now = 1_700_000_000.0
    for url, creds in (
            ("s3://bkt?endpoint=http://127.0.0.1:9000&region=eu-west-1", ("AKIDENV", "env/secret+key", None)),
            ("s3://bkt/pre?endpoint=https://minio.local&region=us-east-1&access_key=AK&secret_key=SK"
             "&session_token=TOKEN", ("AK", "SK", "TOKEN")),
            ("s3://bkt?region=ap-south-1&access_key=AK&secret_key=SK", ("AK", "SK", None))):
        s = S3Store(url)
        for key, rng in (("a/b/c_0_1024", "bytes=0-1023"), ("dir/a b+c%~ü=.bin", None)):
            quoted = urllib.parse.quote(s._key(key), safe="/~")
            assert quoted == percent_encode(s._key(key), safe="/~")
            path = f"/bkt/{quoted}"
            ours = s._sign(path, rng, now=now)
            base = s.endpoint or f"https://s3.{s.region}.amazonaws.com"
            req = AWSRequest(method="GET", url=base + path,
                             headers={k: v for k, v in ours.items() if k != "authorization"})
            auth = S3SigV4Auth(Credentials(*creds), "s3", s.region)
            req.context["timestamp"] = ours["x-amz-date"]
            canonical = auth.canonical_request(req)
            sig = auth.signature(auth.string_to_sign(req, canonical), req)
            assert ours["authorization"].endswith(f"Signature={sig}"), (url, key)
            assert f"Credential={creds[0]}/" in ours["authorization"]
        s.close()


def test_s3_light_get_path(s3_server, monkeypatch):
    """Reads go without botocore: no client is built; odd keys, ranges, missing keys and
    buckets, a range past the end; any other answer is handed to the botocore path."""
    w = S3Store(s3_server.url())
    w.create()
    data = _blob(300_000, 9)
    odd = "d i r/ü+%~=.bin"
    for k in ("k", odd):
        w.put(k, data)
    r = S3Store(w.url)
    assert r.get("k") == data and r.get(odd) == data
    assert r.get("k", 1000, 5000) == data[1000:6000]
    assert r.get("k", 299_990) == data[299_990:]
    assert r.get("k", 300_000) == b"" and r.get("k", 400_000, 10) == b""
    buf = bytearray(100_000)
    assert r.get_into(odd, memoryview(buf), 123) == 100_000 and buf == data[123:100_123]
    assert r.get_into("k", memoryview(buf), 250_000) == 50_000 and buf[:50_000] == data[250_000:]
    with pytest.raises(FileNotFoundError):
        r.get("missing")
    with pytest.raises(FileNotFoundError):
        r.get_into("missing", memoryview(buf))
    assert r._client_obj is None                 # botocore never needed
    nb = S3Store(s3_server.url())                # a bucket never created
    with pytest.raises(FileNotFoundError) as ei:
        nb.get("k")
    assert "no such bucket" in str(ei.value)
    # anything but a plain answer goes to the botocore path
    from torchjuice.object import s3 as s3mod

    def refuse(*a, **kw):
        raise s3mod._Fallback()
    monkeypatch.setattr(r, "_light_response", refuse)
    assert r.get("k", 10, 10) == data[10:20]
    assert r.get_into("k", memoryview(buf), 7) == 100_000 and buf == data[7:100_007]
    assert r._client_obj is not None
    for x in (w, r, nb):
        x.close()


def test_s3_light_get_resumes_a_broken_body(s3_server, monkeypatch):
    s = S3Store(s3_server.url())
    s.create()
    s.backoff_base = 0.001
    data = _blob(50_000, 5)
    s.put("k", data)
    starts = []
    real = s._light_response
    monkeypatch.setattr(s, "_light_response",
                        lambda key, k, first, last: starts.append((first, last)) or real(key, k, first, last))
    real_readinto = http.client.HTTPResponse.readinto
    calls = []

    def readinto_once(self, b):          # the first body breaks off after 10,000 bytes
        calls.append(1)
        if len(starts) == 1 and len(calls) == 2:
            raise ConnectionResetError("peer went away")
        if len(starts) == 1:
            return real_readinto(self, memoryview(b)[:10_000])
        return real_readinto(self, b)
    monkeypatch.setattr(http.client.HTTPResponse, "readinto", readinto_once)
    buf = bytearray(40_000)
    assert s.get_into("k", memoryview(buf), 5_000) == 40_000
    assert buf == data[5_000:45_000]
    assert starts == [(5_000, 44_999), (15_000, 44_999)]
    s.close()


def test_s3_light_get_reuses_connections():
    """With a server that keeps connections open, GETs of a thread share one connection; one
    the server closed meanwhile is replaced without an error."""
    import http.server
    import socketserver

    conns, body = [], _blob(1000, 3)

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            conns.append(self.client_address)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            if len(conns) == 3:
                self.close_connection = True       # the server drops it after the 3rd GET

        def log_message(self, *a):
            pass

    srv = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        s = S3Store(f"s3://bkt?endpoint=http://127.0.0.1:{srv.server_address[1]}"
                    "&access_key=a&secret_key=b")
        for _ in range(5):
            assert s.get("k") == body
        assert len(conns) == 5 and len(set(conns)) == 2
        s.close()
    finally:
        srv.shutdown()
        srv.server_close()


def test_s3_prefix_maps_keys(s3_server):
    url = s3_server.url(prefix="some/prefix")
    s = create_store(url)
    s.create()
    s.put("a/b", b"1")
    s.put("c", b"22")
    assert [(o.key, o.size) for o in s.list()] == [("a/b", 1), ("c", 2)]
    assert s.head("c").key == "c"
    bare = S3Store(url.replace("/some/prefix", ""))
    assert sorted(o.key for o in bare.list()) == ["some/prefix/a/b", "some/prefix/c"]
    assert bare.get("some/prefix/c") == b"22"


def test_s3_missing_bucket(s3_server):
    s = S3Store(s3_server.url())      # create() never called
    with pytest.raises(FileNotFoundError):
        s.get("k")
    with pytest.raises(FileNotFoundError):
        s.head("k")


def test_s3_client_is_lazy_and_rebuilt_after_close(s3_server):
    s = S3Store(s3_server.url())
    assert s._client_obj is None
    s.create()
    s.put("k", b"v")
    s.close()
    assert s._client_obj is None
    assert s.get("k") == b"v"


# ---------------------------------------------------------------- FaultyStore

def _mem() -> MemStore:
    s = MemStore(f"mem://fault-{os.urandom(4).hex()}")
    s.create()
    return s


def test_fault_fail_rate():
    f = FaultyStore(_mem(), fail_rate=1.0, seed=1)
    with pytest.raises(OSError) as ei:
        f.put("k", b"v")
    assert isinstance(ei.value, InjectedFault) and ei.value.errno == errno.EIO
    f.inner.put("k", b"v")
    with pytest.raises(OSError):
        f.get("k")
    with pytest.raises(OSError):
        f.get_into("k", memoryview(bytearray(1)))
    f.delete("k")                      # not in fail_ops
    assert f.calls["put"] == 1 and f.calls["get"] == 2 and f.calls["delete"] == 1
    assert f.faults["fail"] == 3


def test_fault_deterministic_with_seed():
    def pattern(seed):
        f = FaultyStore(_mem(), fail_rate=0.5, seed=seed)
        f.inner.put("k", b"v")
        out = []
        for _ in range(64):
            try:
                f.get("k")
                out.append(0)
            except OSError:
                out.append(1)
        return out

    a, b, c = pattern(7), pattern(7), pattern(8)
    assert a == b
    assert a != c
    assert 10 < sum(a) < 54


def test_fault_corrupt():
    f = FaultyStore(_mem(), corrupt_rate=1.0, seed=3)
    data = _blob(1000, 6)
    f.put("k", data)
    got = f.get("k")
    assert len(got) == len(data) and sum(x != y for x, y in zip(got, data)) == 1
    buf = bytearray(1000)
    assert f.get_into("k", memoryview(buf)) == 1000
    assert sum(x != y for x, y in zip(buf, data)) == 1
    assert f.inner.get("k") == data            # the stored object is intact
    assert f.faults["corrupt"] == 2
    f.put("e", b"")
    assert f.get("e") == b""


def test_fault_throttle_connection_and_delay():
    f = FaultyStore(_mem(), throttle_rate=1.0, seed=0)
    with pytest.raises(InjectedThrottle) as ei:
        f.put("k", b"v")
    assert ei.value.errno == errno.EAGAIN
    f = FaultyStore(_mem(), conn_rate=1.0, seed=0)
    with pytest.raises(ConnectionError):
        f.get("k")
    assert isinstance(InjectedConnectionError(), ConnectionError)
    f = FaultyStore(_mem(), delay=0.05, fail_ops=("put",))
    t0 = time.monotonic()
    f.put("k", b"v")
    assert time.monotonic() - t0 >= 0.05
    t0 = time.monotonic()
    assert f.get("k") == b"v"
    assert time.monotonic() - t0 < 0.05


def test_fault_fail_next_and_always():
    f = FaultyStore(_mem())
    f.put("k", b"v")
    f.fail_next(2)
    with pytest.raises(OSError):
        f.head("k")
    with pytest.raises(OSError):
        f.get("k")
    assert f.get("k") == b"v"
    f.fail_next(1, op="put")
    assert f.get("k") == b"v"
    with pytest.raises(OSError):
        f.put("k", b"w")
    f.put("k", b"w")
    f.fail_next(1, op="get", exc=ConnectionError("gone"))
    with pytest.raises(ConnectionError):
        f.get("k")
    f.fail_always()
    for call in (lambda: f.get("k"), lambda: f.list(), lambda: f.delete("k"), f.create):
        with pytest.raises(OSError):
            call()
    f.fail_always(False)
    assert [o.key for o in f.list()] == ["k"]
    f.fail_always(ops=["delete"])
    with pytest.raises(OSError):
        f.delete("k")
    assert f.get("k") == b"w"
    f.reset()
    assert not f.calls and not f.faults
    f.delete("k")
    assert isinstance(f, ObjectStore) and "FaultyStore" in repr(f)


def test_fault_wraps_every_store(store):
    f = FaultyStore(store, fail_rate=0.3, seed=11)
    ok = 0
    for i in range(30):
        try:
            f.put(f"k{i}", b"x")
            ok += 1
        except OSError:
            pass
    assert len(list(f.list())) == ok
    assert f.faults["fail"] == 30 - ok > 0
