"""Every strategy × task × ZeRO-2/3, 2 ranks on CPU under our launcher (the matrix: tests/trainer/matrix.py)."""

from __future__ import annotations

import pytest

from tests.trainer.matrix import ALL_CASES, ZERO3_LORA, Case, Matrix, build_matrix, check_case, check_zero3_lora


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory, tiny_backbones: dict) -> Matrix:
    return build_matrix(tmp_path_factory.mktemp("matrix"), tiny_backbones, ALL_CASES, nproc=2, precision="fp32")


@pytest.mark.parametrize("case", ALL_CASES, ids=[c.id for c in ALL_CASES])
def test_strategy_matrix(matrix: Matrix, case: Case) -> None:
    check_case(matrix, case)


@pytest.mark.parametrize("case", ZERO3_LORA, ids=[c.id for c in ZERO3_LORA])
def test_zero3_lora_adapter_equals_gathered_weights(matrix: Matrix, case: Case) -> None:
    check_zero3_lora(matrix, case)
