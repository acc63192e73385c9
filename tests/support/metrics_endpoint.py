"""A real prometheus-client metrics endpoint on loopback, for tests that play a trainer's rank 0."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, start_http_server


@contextlib.contextmanager
def serving(registry: CollectorRegistry) -> Iterator[str]:
    """Serve ``registry`` on a free loopback port (prometheus-client's own server); yield its /metrics URL."""
    server, _thread = start_http_server(0, "127.0.0.1", registry=registry)
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/metrics"
    finally:
        server.shutdown()
        server.server_close()
