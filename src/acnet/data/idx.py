"""Reader for the IDX format of (Fashion-)MNIST, plain or gzipped."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError

__all__ = ["read_idx"]

_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | Path) -> torch.Tensor:
    """Read one IDX file (``.gz`` or raw) into a tensor; ValueError on a malformed file."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
        raise InputError(f"{path} is not an IDX file (bad magic {data[:4].hex()})")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    dtype = _DTYPES[data[2]]
    count = int(np.prod(dims))
    body = data[4 + 4 * ndim :]
    if len(body) != count * dtype.itemsize:
        raise InputError(f"{path} is truncated: expected {count * dtype.itemsize} bytes of data, "
                         f"found {len(body)}")
    arr = np.frombuffer(body, dtype=dtype).reshape(dims)
    return torch.from_numpy(arr.astype(dtype.newbyteorder("=")).copy())
