"""The loopback servers the tests use (see :mod:`torchjuice.testing`)."""
from torchjuice.testing import (PostgresServer, RedisServer, S3Server, ServerUnavailable,  # noqa: F401
                                free_port)
