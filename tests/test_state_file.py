"""StateFile: windows of hidden states in a temporary file read back bit for bit, and its errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from binq.errors import BinqError
from binq.evaluation.state_file import StateFile


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_states_read_back_bit_for_bit(dtype: torch.dtype, tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    states = [torch.randn(1, 7, 5, generator=generator).to(dtype) for _ in range(4)]
    states[1][0, 0, :3] = torch.tensor([-0.0, 1e-40, -3.0e38]).to(dtype)  # signed zero, subnormal, huge
    store = StateFile(4, (1, 7, 5), dtype, tmp_path)
    for i, x in enumerate(states):
        store[i] = x
    assert len(store) == 4
    for i, x in enumerate(states):
        got = store[i]
        assert got.dtype == dtype and got.shape == x.shape
        assert torch.equal(got.view(-1).view(torch.uint8), x.view(-1).view(torch.uint8))
    store.close()


def test_a_state_overwritten_leaves_the_others_and_the_folder_empty(tmp_path: Path) -> None:
    store = StateFile(3, (2, 3), torch.float32, tmp_path)
    for i in range(3):
        store[i] = torch.full((2, 3), float(i))
    store[1] = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    assert torch.equal(store[0], torch.zeros(2, 3)) and torch.equal(store[2], torch.full((2, 3), 2.0))
    assert torch.equal(store[1], torch.arange(6, dtype=torch.float32).reshape(2, 3))
    assert list(tmp_path.iterdir()) == []  # the file has no name: nothing to leave behind
    store.close()


def test_a_non_contiguous_state_is_written_as_its_values(tmp_path: Path) -> None:
    store = StateFile(1, (3, 2), torch.float32, tmp_path)
    x = torch.arange(6, dtype=torch.float32).reshape(2, 3).T  # a transposed view
    store[0] = x
    assert torch.equal(store[0], x)
    store.close()


def test_wrong_indices_shapes_and_folders_are_refused(tmp_path: Path) -> None:
    store = StateFile(2, (4,), torch.float32, tmp_path)
    with pytest.raises(IndexError):
        store[2]
    with pytest.raises(IndexError):
        store[-1] = torch.zeros(4)
    with pytest.raises(ValueError, match="expected"):
        store[0] = torch.zeros(5)
    with pytest.raises(ValueError, match="expected"):
        store[0] = torch.zeros(4, dtype=torch.float64)
    store.close()
    with pytest.raises(BinqError, match="cannot make a 32-byte state file"):
        StateFile(2, (4,), torch.float32, tmp_path / "missing")
