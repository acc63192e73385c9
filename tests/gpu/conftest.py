"""The GPU suite: skipped as a whole, with its reason, where torch sees no CUDA device (CI, laptops)."""

from __future__ import annotations

import pytest

from tests.trainer.conftest import tiny_backbones  # noqa: F401 (the same tiny checkpoints as the CPU suite)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device: the GPU suite runs with `make gpu-check` on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
