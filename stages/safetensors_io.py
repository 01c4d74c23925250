"""Streamed safetensors access: read the header, read row chunks of one tensor, patch a copy.

A safetensors file is ``[u64 little-endian header length][JSON header][data]``; the header maps
each tensor name to ``dtype``, ``shape`` and ``data_offsets`` (relative to the data start) and
may hold ``__metadata__``. :func:`patch_copy` writes a copy of a shard in which only chosen
tensors' byte ranges are recomputed: the header bytes, every offset and ``__metadata__`` stay
identical, untouched ranges are copied by the kernel (``copy_file_range``, a reflink where the
file system has them), and an edited tensor is produced chunk by chunk, so memory stays at one
chunk (not one tensor, not one shard).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from stages.cliutil import fail

# safetensors dtype name -> (torch dtype name, item size in bytes)
FLOAT_DTYPES = {"F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2)}
ITEM_SIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
    "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "F8_E4M3FNUZ": 1,
    "F8_E5M2FNUZ": 1, "F4": 1, "F6_E2M3": 1, "F6_E3M2": 1,
}
MAX_HEADER = 100 * 1024 * 1024
COPY_BLOCK = 64 * 1024 * 1024
CHUNK_ELEMENTS = 4 * 1024 * 1024  # elements per chunk: 16 MB in fp32


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class Header:
    path: Path
    data_start: int  # 8 + header length
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    size: int  # file size in bytes


def read_header(path: str | os.PathLike) -> Header:
    """Parse the header of a safetensors file; fail clearly if it is not one."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            raw = handle.read(8)
            if len(raw) < 8:
                fail(f"{path} is not a safetensors file (too short); re-download or re-save the model")
            (length,) = struct.unpack("<Q", raw)
            if length > MAX_HEADER or 8 + length > size:
                fail(f"{path} is not a valid safetensors file (header length {length}); re-download it")
            header = json.loads(handle.read(length))
    except OSError as exc:
        fail(f"cannot read {path} ({exc.strerror}); check that the file exists and is readable")
    except ValueError:
        fail(f"{path} has a corrupt safetensors header; re-download or re-save the model")
    data_start = 8 + length
    metadata = header.pop("__metadata__", None) or {}
    tensors = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        tensors[name] = TensorInfo(name, entry["dtype"], tuple(entry["shape"]), data_start + begin, data_start + end)
        if data_start + end > size:
            fail(f"{path} is truncated: tensor {name} ends past the end of the file; re-download it")
    return Header(path, data_start, tensors, dict(metadata), size)


def torch_dtype(dtype: str):
    import torch

    if dtype not in FLOAT_DTYPES:
        raise KeyError(dtype)
    return getattr(torch, FLOAT_DTYPES[dtype][0])


def compute_dtype(dtype: str):
    """Edits run in fp32 (fp64 for fp64 tensors) and are cast back to the stored dtype."""
    import torch

    return torch.float64 if dtype == "F64" else torch.float32


def as_rows(info: TensorInfo) -> tuple[int, int]:
    """The 2-D view ``[rows, last axis]`` of a tensor (a 1-D tensor is one row)."""
    if not info.shape:
        return 1, 1
    cols = info.shape[-1]
    return (info.numel // cols if cols else 0), cols


def row_chunks(info: TensorInfo, chunk_elements: int = CHUNK_ELEMENTS) -> Iterator[tuple[int, int]]:
    """``(first row, end row)`` ranges of at most ``chunk_elements`` elements (at least one row)."""
    rows, cols = as_rows(info)
    step = max(1, chunk_elements // max(cols, 1))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def read_rows(fd: int, info: TensorInfo, start: int, end: int):
    """Rows ``[start, end)`` of the 2-D view, as a fresh writable tensor of the stored dtype."""
    import torch

    _, cols = as_rows(info)
    item = FLOAT_DTYPES[info.dtype][1]
    offset = info.begin + start * cols * item
    count = (end - start) * cols * item
    buf = bytearray(count)
    read_into(fd, memoryview(buf), offset, info.name)
    return torch.frombuffer(buf, dtype=torch_dtype(info.dtype)).view(end - start, cols)


def read_into(fd: int, view: memoryview, offset: int, what: str = "a tensor") -> None:
    """Fill ``view`` with the bytes of ``fd`` at ``offset`` (no extra copy where ``preadv`` exists)."""
    got = 0
    while got < len(view):
        if hasattr(os, "preadv"):
            n = os.preadv(fd, [view[got:]], offset + got)
        else:  # pragma: no cover - platforms without preadv
            block = os.pread(fd, len(view) - got, offset + got)
            view[got : got + len(block)] = block
            n = len(block)
        if n <= 0:
            fail(f"unexpected end of file while reading {what}; the shard is truncated, re-download it")
        got += n


def tensor_bytes(tensor) -> memoryview:
    """The raw little-endian bytes of a contiguous tensor (any dtype, incl. bfloat16)."""
    import torch

    return memoryview(tensor.contiguous().view(torch.uint8).numpy()).cast("B")


def write_at(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def copy_range(src: int, dst: int, offset: int, count: int) -> None:
    """Copy ``count`` bytes at ``offset`` from ``src`` to the same offset of ``dst`` (in-kernel)."""
    done = 0
    while done < count:
        n = 0
        if hasattr(os, "copy_file_range"):
            try:
                n = os.copy_file_range(src, dst, min(count - done, 1 << 30), offset + done, offset + done)
            except OSError:
                n = 0
        if n <= 0:  # no kernel copy here (other OS, file system, or EOF race): plain read/write
            block = os.pread(src, min(count - done, COPY_BLOCK), offset + done)
            if not block:
                fail("unexpected end of file while copying a shard; the input shard is truncated")
            write_at(dst, block, offset + done)
            n = len(block)
        done += n


# A producer gets (input fd, tensor info, write(chunk_tensor, first_row)) and writes every row.
Producer = Callable[[int, TensorInfo, Callable], None]


def patch_copy(src_path: str | os.PathLike, dst_path: str | os.PathLike, producers: dict[str, Producer],
               progress: Callable[[int], None] | None = None) -> None:
    """Write ``dst_path`` = ``src_path`` with the tensors in ``producers`` recomputed in place.

    Every byte outside the produced tensors is copied verbatim (header, offsets, metadata,
    padding); each producer must write its tensor's rows through the ``write`` callback it gets.
    ``progress(n)`` is called with the number of bytes done after each step.
    """
    header = read_header(src_path)
    edited = sorted((header.tensors[name] for name in producers), key=lambda info: info.begin)
    src = os.open(src_path, os.O_RDONLY)
    try:
        dst = os.open(dst_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            pos = 0
            for info in edited:
                if info.begin > pos:
                    copy_range(src, dst, pos, info.begin - pos)
                    if progress:
                        progress(info.begin - pos)
                _produce(src, dst, info, producers[info.name])
                if progress:
                    progress(info.nbytes)
                pos = info.end
            if header.size > pos:
                copy_range(src, dst, pos, header.size - pos)
                if progress:
                    progress(header.size - pos)
            os.ftruncate(dst, header.size)
        finally:
            os.close(dst)
    finally:
        os.close(src)


def _produce(src: int, dst: int, info: TensorInfo, producer: Producer) -> None:
    _, cols = as_rows(info)
    item = FLOAT_DTYPES[info.dtype][1]
    written = [0]

    def write(chunk, first_row: int) -> None:
        data = tensor_bytes(chunk.to(torch_dtype(info.dtype)))
        offset = info.begin + first_row * cols * item
        if offset < info.begin or offset + len(data) > info.end:
            raise ValueError(f"write outside tensor {info.name}")
        write_at(dst, data, offset)
        written[0] += len(data)

    producer(src, info, write)
    if written[0] != info.nbytes:
        raise ValueError(f"tensor {info.name}: {written[0]} of {info.nbytes} bytes written")
