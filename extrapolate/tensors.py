"""Reading and writing safetensors checkpoints one piece at a time.

Reading: `LazyCheckpoint` maps every tensor name to the file that holds it (a single
`model.safetensors`, or the shards listed in `model.safetensors.index.json`) and reads a tensor, or
a range of its rows, only when asked, through `safetensors.safe_open`. Nothing is loaded up front:
only the JSON headers are parsed, which is what makes the shapes and dtypes of a 100 GB model
available in milliseconds.

Writing: `StreamingShardWriter` writes one output shard in the safetensors format while the data
arrives. `safetensors.torch.save_file` needs every tensor of a shard in memory at once (a 2 GB
shard means 2 GB of RSS); here the header is written first from the planned names, shapes and
dtypes, and each tensor's bytes are appended as they are computed, so the writer holds nothing.
The format is simple enough to write by hand: an 8-byte little-endian header length, a JSON header
mapping each name to {dtype, shape, data_offsets}, then the raw little-endian bytes of every tensor
back to back (https://github.com/huggingface/safetensors#format).
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from wspo.errors import ConfigError, WspoError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# safetensors' dtype codes <-> torch dtypes (the ones a language model checkpoint holds).
DTYPE_FROM_CODE = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
CODE_FROM_DTYPE = {dtype: code for code, dtype in DTYPE_FROM_CODE.items()}

# Rows of a large tensor are read and processed in pieces of about this many elements (4 MiB in
# float32), so the working memory is a few such pieces whatever the size of the largest tensor.
CHUNK_ELEMENTS = 1 << 20


class CheckpointError(WspoError, ValueError):
    """A checkpoint that cannot be read or does not match its partner; the message names the file or tensor."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


class LazyCheckpoint:
    """The tensors of one safetensors file, or of a sharded checkpoint, read on demand.

    `weights_file` names the single-file checkpoint to look for (`adapter_model.safetensors` for a
    PEFT adapter). Every read opens its shard with `safe_open` and closes it again. That is on
    purpose: a `safe_open` handle memory-maps its file, and every page it has read stays mapped, and
    counted in this process's RSS, until the handle is closed. A handle kept open for the whole run
    grows the RSS to the size of both input models (measured: 2.2 x the model for two inputs); one
    opened per read keeps it to the piece being read. Opening costs one parse of the JSON header
    (well under a millisecond), small next to reading a piece of rows.
    """

    def __init__(self, model_dir: str | os.PathLike, weights_file: str = SINGLE_FILE):
        self.dir = Path(model_dir)
        index_path = self.dir / weights_file.replace(".safetensors", ".safetensors.index.json")
        single_path = self.dir / weights_file
        if single_path.is_file():
            files = [single_path]
        elif index_path.is_file():
            weight_map = json.loads(index_path.read_text())["weight_map"]
            files = sorted({self.dir / name for name in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{index_path} lists shard(s) that do not exist: {', '.join(missing)}")
        else:
            found = sorted(p.name for p in self.dir.glob("*.bin")) if self.dir.is_dir() else []
            hint = f" (found {', '.join(found)}: convert it to safetensors first)" if found else ""
            raise CheckpointError(f"{self.dir}: no {weights_file} or {index_path.name}{hint}")

        # Headers only: names, shapes, dtypes. A name in two shards is a broken checkpoint.
        self.tensors: dict[str, TensorInfo] = {}
        for file in files:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                for name in handle.keys():
                    if name in self.tensors:
                        raise CheckpointError(f"tensor {name!r} is stored twice: in {self.tensors[name].file.name} "
                                              f"and {file.name}")
                    piece = handle.get_slice(name)
                    code = piece.get_dtype()
                    if code not in DTYPE_FROM_CODE:
                        raise CheckpointError(f"tensor {name!r} in {file}: unsupported dtype {code}")
                    self.tensors[name] = TensorInfo(name, tuple(piece.get_shape()), DTYPE_FROM_CODE[code], file)

    def names(self) -> list[str]:
        return list(self.tensors)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The whole tensor, or rows [start, end) of its first dimension (read without the rest).

        The returned tensor is a copy that owns its memory; it stays valid after the file is closed.
        """
        info = self.tensors[name]
        with safe_open(str(info.file), framework="pt", device="cpu") as handle:
            if rows is None or len(info.shape) == 0:
                return handle.get_tensor(name)
            start, end = rows
            return handle.get_slice(name)[start:end]


def row_chunks(shape: tuple[int, ...], chunk_elements: int = CHUNK_ELEMENTS) -> list[tuple[int, int] | None]:
    """Row ranges [start, end) that cover a tensor in pieces of about `chunk_elements` elements.

    A 0-d tensor is one piece, `None` (read whole). Rows are the first dimension, which is
    contiguous in a row-major file, so the pieces written one after another form the tensor.
    """
    if len(shape) == 0:
        return [None]
    rows = shape[0]
    row_elements = math.prod(shape[1:])
    rows_per_chunk = max(1, chunk_elements // max(1, row_elements))
    return [(start, min(rows, start + rows_per_chunk)) for start in range(0, rows, rows_per_chunk)] or [(0, 0)]


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """'2GB' -> 2_000_000_000, '500MiB' -> 524_288_000, 1000 -> 1000 (units as in transformers)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).upper() not in _SIZE_UNITS:
        raise ConfigError(f"max_shard_size {text!r}: expected a number of bytes or e.g. '2GB', '500MB', '1GiB'")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])


@dataclass(frozen=True)
class OutputTensor:
    """A tensor to write: its name, shape and the dtype it is written in."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def plan_shards(tensors: list[OutputTensor], max_shard_size: int) -> list[list[OutputTensor]]:
    """Group tensors, in the given order, into shards of at most `max_shard_size` bytes.

    A tensor larger than the limit gets a shard of its own (tensors are never split, as in
    transformers). Within a shard, tensors are ordered by element size, widest first, as
    `safetensors.torch.save_file` does, so every tensor's data starts at an offset aligned to its
    element size.
    """
    shards: list[list[OutputTensor]] = []
    current: list[OutputTensor] = []
    current_bytes = 0
    for tensor in tensors:
        if current and current_bytes + tensor.nbytes > max_shard_size:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(tensor)
        current_bytes += tensor.nbytes
    if current:
        shards.append(current)
    return [sorted(shard, key=lambda t: -t.dtype.itemsize) for shard in shards]  # sort is stable


def shard_file_names(num_shards: int) -> list[str]:
    """transformers' names: one file is `model.safetensors`, several are `model-0000i-of-0000n.safetensors`."""
    if num_shards == 1:
        return [SINGLE_FILE]
    return [f"model-{i:05d}-of-{num_shards:05d}.safetensors" for i in range(1, num_shards + 1)]


class StreamingShardWriter:
    """Writes one safetensors file whose tensors (names, shapes, dtypes, order) are known up front.

    Data is appended with `write(tensor_piece)` in the planned order; `close()` checks that every
    planned byte arrived and renames the temporary file to its final name, so an interrupted run
    never leaves a file that looks complete.
    """

    def __init__(self, path: Path, tensors: list[OutputTensor]):
        self.path = Path(path)
        self.tmp_path = self.path.with_name(self.path.name + ".tmp")
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}  # transformers checks "format"
        offset = 0
        for tensor in tensors:
            header[tensor.name] = {"dtype": CODE_FROM_DTYPE[tensor.dtype], "shape": list(tensor.shape),
                                   "data_offsets": [offset, offset + tensor.nbytes]}
            offset += tensor.nbytes
        self.total_bytes = offset
        header_bytes = json.dumps(header, separators=(",", ":")).encode()
        header_bytes += b" " * (-len(header_bytes) % 8)  # pad so the data starts 8-byte aligned
        self.file = open(self.tmp_path, "wb")
        self.file.write(struct.pack("<Q", len(header_bytes)))
        self.file.write(header_bytes)
        self.written = 0

    def write(self, piece: torch.Tensor) -> None:
        """Append a tensor, or consecutive rows of one, in its final dtype."""
        data = piece.contiguous().reshape(-1).view(torch.uint8).numpy()  # raw little-endian bytes, no copy
        self.file.write(data)
        self.written += data.nbytes

    def close(self) -> None:
        self.file.close()
        if self.written != self.total_bytes:
            raise RuntimeError(f"{self.path.name}: wrote {self.written} bytes of data, planned {self.total_bytes}")
        os.replace(self.tmp_path, self.path)


def write_index(out_dir: Path, shards: list[list[OutputTensor]], file_names: list[str]) -> None:
    """`model.safetensors.index.json` in transformers' layout (only when there are several shards)."""
    if len(shards) == 1:
        return
    weight_map = {t.name: file_name for shard, file_name in zip(shards, file_names) for t in shard}
    index = {
        "metadata": {"total_size": sum(t.nbytes for shard in shards for t in shard)},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
