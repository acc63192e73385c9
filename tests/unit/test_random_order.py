"""The random-order plugin (``-p tests.support.random_order --random-order-seed N``): reproducible shuffles
that keep each module's tests together (module-scoped fixtures are set up once)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tests.support import random_order


@dataclass
class Item:
    nodeid: str


@dataclass
class Config:
    seed: int | None

    def getoption(self, name: str) -> Any:
        assert name == "--random-order-seed"
        return self.seed


def collected() -> list[Item]:
    return [Item(f"tests/m{m}.py::{'C::' if t % 2 else ''}test_{t}") for m in range(4) for t in range(6)]


def shuffle(seed: int | None) -> list[str]:
    items = collected()
    random_order.pytest_collection_modifyitems(Config(seed), items)  # type: ignore[arg-type]
    return [item.nodeid for item in items]


def test_no_seed_keeps_the_order() -> None:
    assert shuffle(None) == [item.nodeid for item in collected()]


def test_a_seed_shuffles_reproducibly_and_keeps_modules_together() -> None:
    first, again, other = shuffle(1), shuffle(1), shuffle(2)
    assert first == again
    assert first != other
    assert sorted(first) == sorted(item.nodeid for item in collected())
    modules = [nodeid.split("::")[0] for nodeid in first]
    runs = [module for i, module in enumerate(modules) if i == 0 or module != modules[i - 1]]
    assert len(runs) == 4, "each module's tests run together"
    assert any(shuffle(seed)[:6] != [item.nodeid for item in collected()][:6] for seed in range(5))
