"""The test servers themselves answer on loopback (so a broken CI setup fails loudly here)."""
import socket


def test_redis_answers(redis_server):
    import redis
    r = redis.Redis.from_url(redis_server.url())
    assert r.ping() is True


def test_postgres_answers(postgres_server):
    import psycopg
    with psycopg.connect(postgres_server.url().replace("postgres://", "postgresql://")) as c:
        assert c.execute("select 41 + 1").fetchone()[0] == 42


def test_s3_answers(s3_server):
    with socket.create_connection(("127.0.0.1", s3_server.port), timeout=2):
        pass
