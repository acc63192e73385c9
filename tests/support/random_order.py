"""A pytest plugin that runs the tests in a random order, reproducibly: ``-p tests.support.random_order
--random-order-seed N`` (what ``pytest-randomly`` does, without a new dependency).

Modules are shuffled, then the classes within a module, then the tests within each; a module's tests
stay together so that its module-scoped fixtures (an emulator, an operator) are set up once.  The seed
is printed in the header so a failing order can be replayed.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable
from typing import TypeVar

import pytest

T = TypeVar("T")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--random-order-seed",
        type=int,
        default=None,
        help="shuffle modules, classes and tests with this seed (tests.support.random_order)",
    )


def pytest_report_header(config: pytest.Config) -> str | None:
    seed = config.getoption("--random-order-seed")
    return f"random order: --random-order-seed {seed}" if seed is not None else None


def _shuffled_groups(items: list[T], key: Callable[[T], Hashable], rng: random.Random) -> list[list[T]]:
    groups: dict[Hashable, list[T]] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    order = list(groups.values())
    rng.shuffle(order)
    return order


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    seed = config.getoption("--random-order-seed")
    if seed is None:
        return
    rng = random.Random(seed)  # noqa: S311 (a test order, not security)
    shuffled: list[pytest.Item] = []
    for module in _shuffled_groups(items, lambda item: item.nodeid.split("::")[0], rng):
        for group in _shuffled_groups(module, lambda item: item.nodeid.rsplit("::", 1)[0], rng):
            rng.shuffle(group)
            shuffled.extend(group)
    items[:] = shuffled
