"""Fixtures for the checkpoint and storage tests: moto S3 on loopback (tests/support/s3.py)."""

from tests.support.s3 import moto_process, s3_server

__all__ = ["moto_process", "s3_server"]
