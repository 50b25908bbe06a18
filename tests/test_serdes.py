"""The safetensors byte format: golden bytes against the safetensors library, and strict header decoding."""

from __future__ import annotations

import json
import struct
import unittest

import safetensors.torch
import torch

from vua.errors import FragmentFormatError
from vua.serdes import (
    MAX_HEADER_BYTES,
    bytes_to_tensor,
    decode_header,
    dtype_name,
    encode_header,
    tensor_to_bytes,
    torch_dtype,
)

_OPTIONAL = ["uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"]
DTYPES = [
    torch.float16, torch.bfloat16, torch.float32, torch.float64,
    torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool,
    *(getattr(torch, name) for name in _OPTIONAL if hasattr(torch, name)),
]
SHAPES = [(3, 5), (7,), (), (0,), (2, 0, 3), (1, 1, 1, 9)]


def _sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random bit patterns (NaNs and infinities included) of ``dtype``; bools are 0 or 1."""
    generator = torch.Generator().manual_seed(seed)
    count = 1
    for s in shape:
        count *= s
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    raw = torch.randint(0, 256, (count * dtype.itemsize,), dtype=torch.uint8, generator=generator)
    return raw.view(dtype).reshape(shape)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


class GoldenBytesTest(unittest.TestCase):
    def test_byte_identical_to_safetensors_both_ways(self) -> None:
        for dtype in DTYPES:
            for index, shape in enumerate(SHAPES):
                with self.subTest(dtype=dtype, shape=shape):
                    tensor = _sample(dtype, shape, index)
                    ours = tensor_to_bytes(tensor, "t")
                    theirs = safetensors.torch.save({"t": tensor})
                    self.assertEqual(ours, theirs)
                    self.assertTrue(_same_bits(safetensors.torch.load(ours)["t"], tensor))
                    self.assertTrue(_same_bits(bytes_to_tensor(theirs, "t"), tensor))

    def test_non_contiguous_input_and_unusual_names(self) -> None:
        tensor = torch.arange(24, dtype=torch.float32).reshape(4, 6)[:, ::2]
        for name in ("layer.0.keys", "ünï/cödé"):
            self.assertEqual(tensor_to_bytes(tensor, name), safetensors.torch.save({name: tensor.contiguous()}))
            self.assertTrue(_same_bits(bytes_to_tensor(tensor_to_bytes(tensor, name), name), tensor))

    def test_bytes_to_tensor_returns_a_writable_copy(self) -> None:
        buffer = bytearray(tensor_to_bytes(torch.ones(4), "t"))
        loaded = bytes_to_tensor(buffer, "t")
        loaded.add_(1)
        self.assertTrue(torch.equal(bytes_to_tensor(buffer, "t"), torch.ones(4)))

    def test_type_errors_name_the_argument(self) -> None:
        with self.assertRaisesRegex(TypeError, "expected a torch.Tensor, got list"):
            tensor_to_bytes([1, 2], "t")  # type: ignore[arg-type]
        with self.assertRaisesRegex(TypeError, "tensor name must be a str, got int"):
            tensor_to_bytes(torch.ones(1), 3)  # type: ignore[arg-type]
        with self.assertRaisesRegex(FragmentFormatError, "no tensor named 'u'"):
            bytes_to_tensor(tensor_to_bytes(torch.ones(1), "t"), "u")

    def test_dtype_table(self) -> None:
        for dtype in DTYPES:
            self.assertEqual(torch_dtype(dtype_name(dtype)), dtype)
        with self.assertRaisesRegex(FragmentFormatError, "unknown safetensors dtype 'f32'"):
            torch_dtype("f32")


class HeaderTest(unittest.TestCase):
    def test_aligned_header_is_accepted_by_safetensors(self) -> None:
        tensors = {"a": torch.arange(6, dtype=torch.int64), "b": torch.randn(3, 1024)}
        header, entries = encode_header(
            [(name, dtype_name(t.dtype), t.shape) for name, t in tensors.items()], {"k": "v"}, alignment=4096
        )
        self.assertEqual(len(header) % 4096, 0)
        self.assertEqual([(e.name, e.begin, e.end) for e in entries], [("a", 0, 48), ("b", 48, 48 + 12288)])
        blob = header + b"".join(t.numpy().tobytes() for t in tensors.values())
        decoded = decode_header(blob, len(blob))
        self.assertEqual(decoded.data_start, len(header))
        self.assertEqual(decoded.metadata, {"k": "v"})
        self.assertEqual(decoded.entries, entries)
        loaded = safetensors.torch.load(blob)
        for name, tensor in tensors.items():
            self.assertTrue(torch.equal(loaded[name], tensor))

    def _blob(self, doc: object, data: bytes = b"", pad: bytes = b"") -> bytes:
        text = (json.dumps(doc).encode() if not isinstance(doc, bytes) else doc) + pad
        return struct.pack("<Q", len(text)) + text + data

    def test_rejects_malformed_headers_with_the_reason(self) -> None:
        good_entry = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
        cases = [
            (b"\x01\x00", "too small for a header"),
            (struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}", "exceeds the"),
            (struct.pack("<Q", 100) + b"{}", "runs past the end"),
            (self._blob(b"{not json"), "not valid JSON"),
            (self._blob(b"\xff\xfe"), "not valid JSON"),
            (self._blob(b"{}", pad=b"\x00"), "not valid JSON"),
            (self._blob([1, 2]), "not an object"),
            (self._blob({"t": {"dtype": "f32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8), "unknown safetensors dtype"),
            (self._blob({"__metadata__": {"a": 1}}), "__metadata__ must map strings to strings"),
            (self._blob({"t": {**good_entry, "data_offsets": [0, 4]}}, b"\0" * 4), "do not hold F32"),
            (self._blob({"t": {**good_entry, "shape": [-2]}}, b"\0" * 8), "bad shape"),
            (self._blob({"t": {**good_entry, "data_offsets": [4, 12]}}, b"\0" * 12), "gap or overlap"),
            (self._blob({"t": good_entry, "u": good_entry}, b"\0" * 8), "gap or overlap"),
            (self._blob({"t": good_entry}, b"\0" * 9), "data section holds 9 bytes but the tensors cover 8"),
            (self._blob({"t": good_entry}, b"\0" * 7), "data section holds 7 bytes"),
            (self._blob({"t": {"shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8), "dtype missing"),
            (self._blob({"t": {**good_entry, "shape": "2"}}, b"\0" * 8), "shape must be a list of integers"),
            (self._blob({"t": 5}), "entry is not an object"),
        ]
        for blob, reason in cases:
            with self.subTest(reason=reason, blob=blob[:40]):
                with self.assertRaises(FragmentFormatError) as caught:
                    decode_header(blob, len(blob))
                self.assertIn(reason, str(caught.exception))

    def test_accepts_what_safetensors_accepts(self) -> None:
        # Any key order, an empty tensor list, a header not padded to 8.
        entries = {"b": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}, "a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}
        for doc, data in ((entries, b"xy"), ({}, b"")):
            blob = self._blob(doc, data)
            header = decode_header(blob, len(blob))
            self.assertEqual([e.name for e in header.entries], sorted(doc))
            self.assertEqual(sorted(safetensors.torch.load(blob)), sorted(doc))


if __name__ == "__main__":
    unittest.main()
