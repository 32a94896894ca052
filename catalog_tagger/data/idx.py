"""A small, strict reader for the IDX format used by (Fashion-)MNIST.

Format: two zero bytes, a type code, the number of dimensions, then one big-endian
uint32 per dimension, then the data. Every way a download can go wrong (HTML error page,
truncated transfer, wrong file) is reported with the file name and what was expected.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from ..errors import DataError

_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx_bytes(raw: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parse an uncompressed IDX payload into an array of its declared shape."""
    if len(raw) < 4:
        raise DataError(f"{name}: {len(raw)} bytes is too short to be an IDX file")
    if raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{name}: bad magic number {raw[:4].hex()} (IDX files start with two zero bytes)")
    type_code, ndim = raw[2], raw[3]
    if type_code not in _DTYPES:
        raise DataError(f"{name}: unknown IDX data type 0x{type_code:02x}")
    if ndim == 0:
        raise DataError(f"{name}: IDX header declares zero dimensions")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DataError(f"{name}: truncated header ({len(raw)} bytes, need {header_len})")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = _DTYPES[type_code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    got = len(raw) - header_len
    if got != expected:
        kind = "truncated" if got < expected else "has trailing bytes"
        raise DataError(f"{name}: {kind}: header declares shape {shape} ({expected} data bytes) but {got} follow")
    return np.frombuffer(raw, dtype=dtype, offset=header_len).reshape(shape).astype(dtype.newbyteorder("="))


def read_payload(path: Path) -> bytes:
    """The uncompressed bytes of an IDX file, gzip-compressed or not (detected from content)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{path}: corrupt or truncated gzip data ({exc})") from exc
    return raw


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file, gzip-compressed or not."""
    return read_idx_bytes(read_payload(path), str(path))


def write_idx(path: Path, array: np.ndarray, compress: bool | None = None) -> None:
    """Write an array as IDX (used to make test fixtures and caches); gzip if the name ends .gz."""
    codes = {dtype: code for code, dtype in _DTYPES.items()}
    big = array.astype(array.dtype.newbyteorder(">"), copy=False)
    code = codes.get(big.dtype) or codes[array.dtype]
    header = bytes([0, 0, code, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + big.tobytes()
    path = Path(path)
    if compress is None:
        compress = path.suffix == ".gz"
    path.write_bytes(gzip.compress(payload, compresslevel=6, mtime=0) if compress else payload)
