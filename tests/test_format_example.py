"""doc/format.md's example (section 3.4) is what VUA writes, byte for byte."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from vua.config import VUAConfig
from vua.core import VUA
from vua.serdes import decode_header_length

SPEC = Path(__file__).parents[1] / "doc" / "format.md"


def test_the_spec_example_is_what_vua_writes(tmp_path: Path) -> None:
    example = SPEC.read_text().split("### 3.4 Example", 1)[1].split("### 3.5", 1)[0]
    header_json = re.search(r"```json\n(.+?)\n```", example, re.DOTALL).group(1)
    with VUA(VUAConfig(split_factor=4), tmp_path) as vua:
        keys = torch.arange(48, dtype=torch.float16).reshape(1, 2, 8, 3)
        vua.put(torch.arange(1, 9), [(keys, keys + 100)])
    files = {path.read_bytes() for path in tmp_path.rglob("*.safetensors")}
    second = [data for data in files if b'"vua_start":"4"' in data]
    assert len(second) == 1
    data = second[0]
    length = decode_header_length(data, len(data))
    assert (len(data), length) == (4224, 4088)
    assert data[8 : 8 + length].rstrip(b" ").decode() == header_json
