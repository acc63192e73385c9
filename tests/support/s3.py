"""Real S3 protocol for tests: moto's server on loopback, in-process or as a killable subprocess.

* :func:`threaded_moto` / the ``s3_server`` fixture: ``moto.server.ThreadedMotoServer``
  on 127.0.0.1 and a free port, with fake credentials in the environment.
* :class:`MotoProcess`: ``python -m moto.server`` as a subprocess that a test can
  SIGKILL in the middle of an upload and start again on the same port.  moto keeps
  objects in memory, so the subprocess records every request
  (``MOTO_ENABLE_RECORDING``) and a restart replays the recording: objects written
  before the outage are still there afterwards, as with a real store.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from kubetune_operator.localpods import free_port

FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing-kubetune-key",
    "AWS_SECRET_ACCESS_KEY": "testing-kubetune-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def wait_until_serving(port: int, timeout: float = 30.0) -> None:
    """Block until something accepts connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing serves 127.0.0.1:{port} after {timeout}s")


def s3_client(endpoint: str) -> Any:
    """A plain boto3 client for inspecting what landed in the store (independent of kubetune's code)."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
        config=Config(request_checksum_calculation="when_required", response_checksum_validation="when_required"),
    )


@dataclass
class S3Endpoint:
    """A running S3 endpoint with one bucket."""

    endpoint: str
    bucket: str

    def client(self) -> Any:
        return s3_client(self.endpoint)

    def uri(self, prefix: str = "") -> str:
        return f"s3://{self.bucket}/{prefix}".rstrip("/")

    def keys(self, prefix: str = "") -> list[str]:
        """Every key in the bucket under ``prefix``."""
        client = self.client()
        out: list[str] = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            out.extend(o["Key"] for o in page.get("Contents", []))
        return sorted(out)

    def read(self, key: str) -> bytes:
        return bytes(self.client().get_object(Bucket=self.bucket, Key=key)["Body"].read())

    def write(self, key: str, data: bytes) -> None:
        self.client().put_object(Bucket=self.bucket, Key=key, Body=data)


@contextlib.contextmanager
def threaded_moto(bucket: str = "kubetune-test") -> Iterator[S3Endpoint]:
    """moto's ThreadedMotoServer on 127.0.0.1 with ``bucket`` created."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        wait_until_serving(port)
        # moto keeps its buckets in process-wide state that outlives a server: reset it, so a test
        # never sees the objects an earlier test in this process left behind.
        reset = urllib.request.Request(f"http://127.0.0.1:{port}/moto-api/reset", method="POST")
        urllib.request.urlopen(reset, timeout=10).close()  # noqa: S310 (loopback http)
        endpoint = S3Endpoint(f"http://127.0.0.1:{port}", bucket)
        endpoint.client().create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        server.stop()


def one_request_per_line(recording: Path) -> None:
    """Rewrite moto's recording with one JSON document per line.

    moto's recorder appends each request from the server's handler threads without a lock, so
    two concurrent uploads can land on one line (``{...}{...}``); its replay stops at the first
    such line and silently drops everything after it.
    """
    decoder = json.JSONDecoder()
    documents = []
    for line in recording.read_text().splitlines():
        position, line = 0, line.strip()
        while position < len(line):
            document, position = decoder.raw_decode(line, position)
            documents.append(document)
            while position < len(line) and line[position].isspace():
                position += 1
    recording.write_text("".join(json.dumps(d) + "\n" for d in documents))


@dataclass
class MotoProcess:
    """``python -m moto.server`` on a fixed loopback port that can be killed and started again."""

    port: int
    recording: Path
    log_path: Path
    bucket: str = "kubetune-test"
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def endpoint(self) -> S3Endpoint:
        return S3Endpoint(f"http://127.0.0.1:{self.port}", self.bucket)

    def start(self) -> None:
        """Start the server; on a restart, replay what was recorded before (moto keeps no state on disk)."""
        replay = self.recording.exists() and self.recording.stat().st_size > 0
        env = {
            **os.environ,
            **FAKE_CREDENTIALS,
            "MOTO_ENABLE_RECORDING": "True",
            "MOTO_RECORDER_FILEPATH": str(self.recording),
        }
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_until_serving(self.port)
        if replay:
            import requests

            one_request_per_line(self.recording)

            # Replaying appends nothing (the recorder is paused while replaying).
            requests.post(f"http://127.0.0.1:{self.port}/moto-api/recorder/replay-recording", timeout=120)
        else:
            self.endpoint.client().create_bucket(Bucket=self.bucket)

    def kill(self) -> None:
        """SIGKILL the server (as a crashed node would lose it)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@pytest.fixture
def s3_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Endpoint]:
    """An in-process moto S3 server on loopback with a bucket, and fake credentials in the environment."""
    for name, value in FAKE_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    with threaded_moto() as endpoint:
        yield endpoint


@pytest.fixture
def moto_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[MotoProcess]:
    """A moto server subprocess (killable, restartable on the same port) with a bucket."""
    for name, value in FAKE_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    server = MotoProcess(port=free_port(), recording=tmp_path / "moto-recording.jsonl", log_path=tmp_path / "moto.log")
    server.start()
    try:
        yield server
    finally:
        server.kill()
