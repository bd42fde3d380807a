"""Checkpoint shard files, written and read tensor by tensor.

`safetensors.torch.save` builds the whole file as one bytes object next to the tensors (and
`save_file` first copies every tensor to bytes), so a rank writing a shard peaked at about twice
the shard. Here the file is streamed: the safetensors header first, then each tensor's own memory
(a zero-copy view), with the SHA-256 updated as it goes. Reading checks the SHA-256 over the file in
fixed-size chunks, then lets safetensors open the file and materialise one tensor at a time.

The layout is safetensors' (8-byte little-endian header length, JSON header with dtype, shape and
byte offsets, padded to 8 bytes, then the data), so any safetensors reader opens these files.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
CHUNK = 16 << 20  # bytes hashed at a time when a shard is read


def _raw(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes, without copying a contiguous CPU tensor."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def write(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    """Write `tensors` as a safetensors file at `path`, fsynced; return its SHA-256 (hex)."""
    header, offset = {}, 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for piece in (len(encoded).to_bytes(8, "little"), encoded):
            f.write(piece)
            digest.update(piece)
        for tensor in tensors.values():
            data = _raw(tensor)
            f.write(data)
            digest.update(data)
        f.flush()
        os.fsync(f.fileno())
    return digest.hexdigest()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def read(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors file at `path` (check its SHA-256 with `sha256_of` first).
    Raises safetensors' SafetensorError for a file that is not one."""
    with safe_open(str(path), framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
