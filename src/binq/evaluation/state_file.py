"""Hidden states of many windows kept in a temporary file, one window in memory at a time.

A streamed run's layer-wise evaluation (:mod:`binq.evaluation.layerwise`) carries two streams of hidden
states, every evaluation window's, from block to block; it touches them only twice per block, once per
stream, and one window at a time. In between, while the block is quantized, they would sit in memory
beside the calibration activations (on SmolLM2 under the quick protocol, 2 x 36 MiB beside 36 MiB).
A :class:`StateFile` keeps them in an anonymous temporary file instead: the operating system's page
cache holds what fits and drops what it must, and the process's own memory holds the one window being
read or written. The bytes are the tensors' own, so a window reads back bit for bit as written.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import torch

from binq.errors import BinqError


class StateFile:
    """``count`` tensors of one ``shape`` and ``dtype``, indexable like a list, stored in an unlinked file.

    The file is created already deleted from its folder (``tempfile.TemporaryFile``), so nothing is left
    behind if the process dies; :meth:`close` frees its space at once.
    """

    def __init__(
        self, count: int, shape: tuple[int, ...], dtype: torch.dtype, folder: str | Path | None = None
    ) -> None:
        self.count, self.shape, self.dtype = count, tuple(shape), dtype
        self.nbytes = math.prod(self.shape) * torch.empty((), dtype=dtype).element_size()
        try:
            self._file = tempfile.TemporaryFile(dir=folder)  # noqa: SIM115 (open as long as the object)
            self._file.truncate(count * self.nbytes)
        except OSError as error:
            where = folder if folder is not None else tempfile.gettempdir()
            raise BinqError(f"cannot make a {count * self.nbytes:,}-byte state file in {where} ({error})") from None
        self._fd = self._file.fileno()

    def __len__(self) -> int:
        return self.count

    def _offset(self, index: int) -> int:
        if not 0 <= index < self.count:
            raise IndexError(f"state {index} of {self.count}")
        return index * self.nbytes

    def __getitem__(self, index: int) -> torch.Tensor:
        offset = self._offset(index)
        tensor = torch.empty(self.shape, dtype=self.dtype)
        view = memoryview(tensor.view(-1).view(torch.uint8).numpy())
        done = 0
        while done < self.nbytes:
            read = os.preadv(self._fd, [view[done:]], offset + done)
            if read <= 0:
                raise BinqError(f"the state file ended inside state {index}")
            done += read
        return tensor

    def __setitem__(self, index: int, tensor: torch.Tensor) -> None:
        offset = self._offset(index)
        if tuple(tensor.shape) != self.shape or tensor.dtype != self.dtype:
            raise ValueError(f"state of shape {tuple(tensor.shape)} {tensor.dtype}, expected {self.shape} {self.dtype}")
        data = memoryview(tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy())
        done = 0
        while done < self.nbytes:
            written = os.pwrite(self._fd, data[done:], offset + done)
            if written <= 0:
                raise BinqError(f"cannot write state {index} to the state file")
            done += written

    def close(self) -> None:
        self._file.close()
