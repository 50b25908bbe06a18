"""The safetensors byte format: dtype table, header encoding and strict header decoding.

A buffer is ``u64 little-endian N`` + ``N`` bytes of JSON (space padded) + the data section.
Each tensor entry maps a name to ``{"dtype", "shape", "data_offsets"}`` with offsets relative to
the data section; the entries tile the data section exactly. ``__metadata__`` maps strings to
strings. VUA writes the same format and pads the header so the data section starts on a
4 KiB boundary (direct I/O and GPUDirect want aligned file offsets); any safetensors reader
accepts such files. No file I/O happens here.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from .errors import FragmentFormatError

__all__ = [
    "TensorEntry",
    "Header",
    "dtype_name",
    "torch_dtype",
    "itemsize",
    "encode_header",
    "decode_header_length",
    "decode_header",
    "host_bytes",
    "tensor_bytes_view",
    "tensor_to_bytes",
    "bytes_to_tensor",
]

# Refuse headers larger than this before allocating anything for them.
MAX_HEADER_BYTES = 16 * 1024 * 1024
_LENGTH = struct.Struct("<Q")


def _optional_dtypes() -> dict[str, torch.dtype]:
    names = {
        "U16": "uint16",
        "U32": "uint32",
        "U64": "uint64",
        "F8_E4M3": "float8_e4m3fn",
        "F8_E5M2": "float8_e5m2",
        "F8_E4M3FNUZ": "float8_e4m3fnuz",
        "F8_E5M2FNUZ": "float8_e5m2fnuz",
        "F8_E8M0": "float8_e8m0fnu",
    }
    return {k: getattr(torch, v) for k, v in names.items() if hasattr(torch, v)}


_TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I32": torch.int32,
    "F32": torch.float32,
    "I64": torch.int64,
    "F64": torch.float64,
    "C64": torch.complex64,
    **_optional_dtypes(),
}
_NAMES = {v: k for k, v in _TORCH_DTYPES.items()}



def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _NAMES[dtype]
    except KeyError:
        raise FragmentFormatError(f"dtype {dtype} has no safetensors equivalent") from None


def torch_dtype(name: str) -> torch.dtype:
    try:
        return _TORCH_DTYPES[name]
    except KeyError:
        raise FragmentFormatError(f"unknown safetensors dtype {name!r}") from None


def itemsize(name: str) -> int:
    return torch_dtype(name).itemsize


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Header:
    """A decoded header. ``data_start`` is the file offset of the data section."""

    data_start: int
    metadata: dict[str, str]
    entries: tuple[TensorEntry, ...]  # in data-section order

    def entry(self, name: str) -> TensorEntry:
        for e in self.entries:
            if e.name == name:
                return e
        raise FragmentFormatError(f"no tensor named {name!r}")


def encode_header(
    specs: Sequence[tuple[str, str, Sequence[int]]],
    metadata: Mapping[str, str] | None = None,
    alignment: int = 8,
) -> tuple[bytes, tuple[TensorEntry, ...]]:
    """Header bytes (length prefix included) for tensors laid out back to back in ``specs`` order.

    The JSON is padded with spaces so the data section starts at a multiple of ``alignment``.
    """
    entries: list[TensorEntry] = []
    offset = 0
    for name, dtype, shape in specs:
        size = math.prod(shape) * itemsize(dtype)
        entries.append(TensorEntry(name, dtype, tuple(int(s) for s in shape), offset, offset + size))
        offset += size
    doc: dict[str, object] = {}
    if metadata:
        doc["__metadata__"] = dict(metadata)
    for e in entries:
        doc[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [e.begin, e.end]}
    text = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
    padded = -(-(8 + len(text)) // alignment) * alignment - 8
    text += b" " * (padded - len(text))
    return _LENGTH.pack(len(text)) + text, tuple(entries)


def decode_header_length(prefix: bytes | memoryview, file_size: int) -> int:
    """The JSON length N from the first 8 bytes, checked against ``file_size``."""
    if file_size < 8 or len(prefix) < 8:
        raise FragmentFormatError(f"buffer of {file_size} bytes is too small for a header")
    (length,) = _LENGTH.unpack_from(prefix, 0)
    if length > MAX_HEADER_BYTES:
        raise FragmentFormatError(f"header length {length} exceeds the {MAX_HEADER_BYTES}-byte limit")
    if 8 + length > file_size:
        raise FragmentFormatError(f"header length {length} runs past the end of a {file_size}-byte buffer")
    return int(length)


def _int_list(value: object, what: str) -> list[int]:
    if not isinstance(value, list) or not all(type(v) is int for v in value):
        raise FragmentFormatError(f"{what} must be a list of integers, got {value!r}"[:200])
    return value


def decode_header(prefix: bytes | memoryview, file_size: int) -> Header:
    """Parse and validate a header from the first ``8 + N`` bytes of a buffer of ``file_size`` bytes.

    Validation follows safetensors: known dtypes, shapes that match byte ranges, and byte ranges
    that tile the data section exactly, with no gaps, overlaps or trailing bytes.
    """
    length = decode_header_length(prefix, file_size)
    if len(prefix) < 8 + length:
        raise FragmentFormatError("header is truncated")
    raw = bytes(prefix[8 : 8 + length])
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        # ValueError covers bad UTF-8, bad JSON and integers past Python's digit limit;
        # RecursionError, hostile nesting such as "[[[[...".
        raise FragmentFormatError(f"header is not valid JSON: {exc}"[:300]) from None
    if not isinstance(doc, dict):
        raise FragmentFormatError("header JSON is not an object")
    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise FragmentFormatError("__metadata__ must map strings to strings")
    entries = []
    for name, info in doc.items():
        if not isinstance(info, dict):
            raise FragmentFormatError(f"tensor {name!r}: entry is not an object")
        dtype = info.get("dtype")
        if not isinstance(dtype, str):
            raise FragmentFormatError(f"tensor {name!r}: dtype missing")
        size = itemsize(dtype)
        shape = _int_list(info.get("shape"), f"tensor {name!r}: shape")
        offsets = _int_list(info.get("data_offsets"), f"tensor {name!r}: data_offsets")
        if any(s < 0 for s in shape) or len(offsets) != 2:
            raise FragmentFormatError(f"tensor {name!r}: bad shape {shape} or data_offsets {offsets}")
        begin, end = offsets
        if not 0 <= begin <= end or end - begin != math.prod(shape) * size:
            raise FragmentFormatError(
                f"tensor {name!r}: data_offsets {offsets} do not hold {dtype} of shape {shape}"
            )
        entries.append(TensorEntry(name, dtype, tuple(shape), begin, end))
    entries.sort(key=lambda e: (e.begin, e.end))
    position = 0
    for e in entries:
        if e.begin != position:
            raise FragmentFormatError(f"tensor {e.name!r}: data_offsets leave a gap or overlap at {position}")
        position = e.end
    data_start = 8 + length
    if data_start + position != file_size:
        raise FragmentFormatError(
            f"data section holds {file_size - data_start} bytes but the tensors cover {position}"
        )
    return Header(data_start, metadata, tuple(entries))


def host_bytes(tensor: torch.Tensor) -> np.ndarray:
    """A host tensor contiguous in its last dim as a numpy uint8 array ``[..., last_dim * itemsize]``
    (zero-copy; bf16 and fp8 included), so that slices of it can be I/O buffers."""
    return tensor.view(torch.uint8).numpy()


def tensor_bytes_view(tensor: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor (bf16 and fp8 included)."""
    flat = tensor.reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return flat.view(torch.uint8).numpy().data.cast("B")


def tensor_to_bytes(tensor: torch.Tensor, name: str, metadata: Mapping[str, str] | None = None) -> bytes:
    """One tensor as a safetensors buffer, byte-identical to ``safetensors.torch.save({name: tensor})``."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(tensor).__name__}")
    if not isinstance(name, str):
        raise TypeError(f"tensor name must be a str, got {type(name).__name__}")
    tensor = tensor.detach().to("cpu").contiguous()
    header, _ = encode_header([(name, dtype_name(tensor.dtype), tensor.shape)], metadata)
    return header + tensor_bytes_view(tensor).tobytes()


def bytes_to_tensor(buffer: bytes | bytearray | memoryview, name: str) -> torch.Tensor:
    """The tensor ``name`` from a safetensors buffer (ours or the safetensors library's), as a copy."""
    view = memoryview(buffer).cast("B")
    header = decode_header(view[: 8 + decode_header_length(view[:8], len(view))], len(view))
    entry = header.entry(name)
    dtype = torch_dtype(entry.dtype)
    if entry.nbytes == 0:
        return torch.empty(entry.shape, dtype=dtype)
    start = header.data_start + entry.begin
    data = bytearray(view[start : start + entry.nbytes])
    return torch.frombuffer(data, dtype=torch.uint8).view(dtype).reshape(entry.shape)
