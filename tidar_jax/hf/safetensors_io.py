"""Reading HF safetensors (single file or sharded with an index) tensor by tensor, with up-front validation.

Headers are parsed and checked against the file size before any tensor is read, so a truncated or corrupt
file fails with one line naming it, and nothing is loaded.
"""

from __future__ import annotations

import json
import os
import struct

import numpy as np

from tidar_jax.hf.keys import HFFormatError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def read_header(path: str) -> dict[str, dict]:
    """``{name: {"dtype", "shape", "data_offsets"}}``; raises ``HFFormatError`` if the file is truncated/corrupt."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise HFFormatError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (header_len,) = struct.unpack("<Q", raw)
        if 8 + header_len > size:
            raise HFFormatError(f"{path}: truncated safetensors file (header says {header_len} bytes, file has "
                                f"{size})")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise HFFormatError(f"{path}: corrupt safetensors header (not JSON)") from None
    header.pop("__metadata__", None)
    data_size = size - 8 - header_len
    for name, info in header.items():
        start, end = info["data_offsets"]
        if end > data_size:
            raise HFFormatError(f"{path}: truncated safetensors file (tensor {name} ends at byte {end} of the data "
                                f"section, which has only {data_size})")
        expect = int(np.prod(info["shape"], dtype=np.int64)) * _DTYPE_BYTES.get(info["dtype"], 0)
        if info["dtype"] in _DTYPE_BYTES and end - start != expect:
            raise HFFormatError(f"{path}: corrupt safetensors file (tensor {name} has {end - start} bytes, "
                                f"shape {info['shape']} {info['dtype']} needs {expect})")
    return header


def weight_map(hf_dir: str) -> dict[str, str]:
    """``{tensor name: file path}`` from ``model.safetensors.index.json`` or a single ``model.safetensors``."""
    index_path = os.path.join(hf_dir, INDEX_FILE)
    if os.path.isfile(index_path):
        try:
            with open(index_path) as f:
                mapping = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise HFFormatError(f"{index_path}: not a valid safetensors index (needs a 'weight_map' object)") from None
        files = {}
        for name, fname in mapping.items():
            path = os.path.join(hf_dir, fname)
            if not os.path.isfile(path):
                raise HFFormatError(f"{index_path} names {fname} for {name}, but that file is missing")
            files[name] = path
        return files
    single = os.path.join(hf_dir, SINGLE_FILE)
    if os.path.isfile(single):
        return {name: single for name in read_header(single)}
    if any(n.endswith((".bin", ".pth", ".pt")) for n in os.listdir(hf_dir)):
        raise HFFormatError(f"{hf_dir}: only PyTorch pickle weights found; convert them to safetensors first "
                            "(model.save_pretrained(dir, safe_serialization=True))")
    raise HFFormatError(f"{hf_dir}: no {SINGLE_FILE} or {INDEX_FILE}")


def tensor_headers(files: dict[str, str]) -> dict[str, dict]:
    """Validated header entry of every tensor named in ``files`` (each file's header is read once)."""
    headers: dict[str, dict[str, dict]] = {}
    out = {}
    for name, path in files.items():
        if path not in headers:
            headers[path] = read_header(path)
        if name not in headers[path]:
            raise HFFormatError(f"{path}: the index says it holds {name}, but it does not")
        out[name] = headers[path][name]
    return out


class TensorReader:
    """Reads one tensor at a time as numpy (bf16 as ``ml_dtypes.bfloat16``); keeps files open until closed."""

    def __init__(self, files: dict[str, str]):
        self._files = files
        self._open: dict[str, object] = {}

    def get(self, name: str) -> np.ndarray:
        from safetensors import safe_open

        path = self._files[name]
        if path not in self._open:
            self._open[path] = safe_open(path, framework="numpy")
        try:
            return self._open[path].get_tensor(name)
        except Exception as e:  # safetensors raises its own error types; surface one clear line
            raise HFFormatError(f"{path}: cannot read tensor {name}: {e}") from None

    def close(self):
        self._open.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
