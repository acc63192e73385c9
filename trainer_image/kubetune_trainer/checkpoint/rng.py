"""Per-rank random number generator state (Python, NumPy, torch CPU and accelerator) in a checkpoint file."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch


def capture() -> dict[str, Any]:
    """The current RNG states of this process."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def apply(state: dict[str, Any]) -> None:
    """Restore RNG states captured by :func:`capture` (accelerator states only when there is one)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path: Path) -> None:
    """Write this process's RNG states to ``path``."""
    torch.save(capture(), path)


def load(path: Path) -> None:
    """Restore this process's RNG states from ``path`` (a file we wrote ourselves, so full unpickling is fine)."""
    apply(torch.load(path, map_location="cpu", weights_only=False))
