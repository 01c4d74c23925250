"""Streamed safetensors access: read the header, read row chunks of one tensor, patch a copy.

A safetensors file is ``[u64 little-endian header length][JSON header][data]``; the header maps
each tensor name to ``dtype``, ``shape`` and ``data_offsets`` (relative to the data start) and
may hold ``__metadata__``. :func:`patch_copy` writes a copy of a shard in which only chosen
tensors' byte ranges are recomputed: the header bytes, every offset and ``__metadata__`` stay
identical, untouched ranges are copied by the kernel (``copy_file_range``, a reflink where the
file system has them), and an edited tensor is produced chunk by chunk, so memory stays at a few
chunks (``QUEUE_CHUNKS`` waiting to be written, one per producer thread; never a tensor or a
shard). Chunks are numpy arrays (bf16 is decoded and rounded back by bit operations), so the
ablate stage starts without importing torch.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from abliterate.errors import fail

# safetensors float dtype -> (numpy storage dtype name, item size); BF16 is stored as raw uint16
FLOAT_DTYPES = {"F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("uint16", 2)}
MAX_HEADER = 100 * 1024 * 1024
COPY_BLOCK = 64 * 1024 * 1024
CHUNK_ELEMENTS = 256 * 1024  # elements per chunk: 1 MB in fp32, so each step of an edit stays in cache


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
    """Parse and check the header of a safetensors file (:mod:`abliterate.formats.safetensors_header`);
    one line naming the file (and the tensor) if it is not a valid one."""
    from abliterate.formats.safetensors_header import decode_header, parse_entries

    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            raw = handle.read(8)
            if len(raw) < 8:
                fail(f"{path} is not a safetensors file (too short); re-download or re-save the model")
            (length,) = struct.unpack("<Q", raw)
            if length > MAX_HEADER or 8 + length > size:
                fail(f"{path} is not a valid safetensors file (header length {length} for a file of {size} bytes); "
                     "re-download it")
            text = handle.read(length)
    except OSError as exc:
        fail(f"cannot read {path} ({exc.strerror}); check that the file exists and is readable")
    data_start = 8 + length
    entries, metadata = parse_entries(path, decode_header(path, text), size - data_start)
    tensors = {name: TensorInfo(name, dtype, shape, data_start + begin, data_start + end)
               for name, dtype, shape, begin, end in entries}
    return Header(path, data_start, tensors, metadata, size)


NUMPY_NAMES = {"float64": "F64", "float32": "F32", "float16": "F16", "int64": "I64", "int32": "I32",
               "int16": "I16"}  # numpy dtype name -> safetensors dtype, for write_safetensors


def write_safetensors(tensors: dict, metadata: dict[str, str], path: str | os.PathLike) -> None:
    """Write numpy arrays as a safetensors file, byte-stably (sorted names and metadata keys), atomically.

    The safetensors library writes its metadata in a per-process random order, so two identical
    runs would give different bytes; this writer lays out the same format deterministically.
    """
    import numpy as np

    from abliterate.formats.atomic import atomic_path

    header: dict = {"__metadata__": {str(k): str(v) for k, v in sorted(metadata.items())}}
    blobs: list[bytes] = []
    offset = 0
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        blob = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": NUMPY_NAMES[array.dtype.name], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # data starts 8-byte aligned, as the library does it
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(struct.pack("<Q", len(text)))
        handle.write(text)
        for blob in blobs:
            handle.write(blob)


def compute_dtype(dtype: str):
    """Edits run in fp32 (fp64 for fp64 tensors) and are cast back to the stored dtype."""
    import numpy as np

    return np.float64 if dtype == "F64" else np.float32


def decode(raw, dtype: str, out=None):
    """Stored values (numpy, storage dtype) -> compute dtype; bf16 is the top half of an fp32.

    ``out``: an optional fp32 buffer of the same size (bf16, fp16) to decode into.
    """
    import numpy as np

    if dtype == "BF16":
        if out is None:
            out = np.empty(raw.shape, dtype=np.float32)
        bits = out.view(np.uint32)
        np.copyto(bits, raw)  # widen, then shift in place: faster than one mixed-type shift
        np.left_shift(bits, 16, out=bits)
        return out
    if dtype == "F16" and out is not None:
        np.copyto(out, raw, casting="unsafe")
        return out
    return raw.astype(compute_dtype(dtype), copy=False)


def encode(values, dtype: str, scratch=None, out=None, finite: bool = False):
    """Compute-dtype values -> storage dtype (numpy); bf16 rounds to nearest even, as torch does.

    ``scratch`` (uint32) and ``out`` (uint16): optional buffers of at least the same size, so
    nothing is allocated; ``finite``: the caller knows there is no NaN (skips that check).
    """
    import numpy as np

    if dtype != "BF16":
        return values.astype(FLOAT_DTYPES[dtype][0], copy=False)
    values = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    bits = values.view(np.uint32)
    tmp = np.empty(bits.shape, dtype=np.uint32) if scratch is None else scratch.reshape(-1)[: bits.size]
    np.right_shift(bits, 16, out=tmp)
    np.bitwise_and(tmp, 1, out=tmp)
    np.add(tmp, 0x7FFF, out=tmp)
    np.add(tmp, bits, out=tmp)  # + 0x7FFF + lowest kept bit: round to nearest, ties to even
    out = np.empty(bits.shape, dtype=np.uint16) if out is None else out.reshape(-1)[: bits.size]
    np.right_shift(tmp, 16, out=out, casting="unsafe")  # the high halves (faster than a strided copy)
    if not finite:
        nan = np.isnan(values)
        if nan.any():
            out[nan] = 0x7FC0
    return out


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


class RowReader:
    """Reads row chunks of one tensor into reused buffers and decodes them to the compute dtype."""

    def __init__(self, fd: int, info: TensorInfo, max_rows: int):
        import numpy as np

        self.fd, self.info = fd, info
        _, self.cols = as_rows(info)
        self.storage = np.dtype(FLOAT_DTYPES[info.dtype][0])
        size = max(1, max_rows) * self.cols
        self.buf = np.empty(size, dtype=self.storage)
        self.values = np.empty(size, dtype=np.float32) if info.dtype in ("BF16", "F16") else None

    def read(self, start: int, end: int):
        """Rows ``[start, end)`` as a ``[rows, cols]`` array of the compute dtype.

        The array lives in the reader's buffers: use it (edit it in place) before the next read.
        """
        count = (end - start) * self.cols
        raw = self.buf[:count]
        read_into(self.fd, memoryview(raw).cast("B"), self.info.begin + start * self.cols * self.storage.itemsize,
                  self.info.name)
        out = None if self.values is None else self.values[:count]
        return decode(raw, self.info.dtype, out).reshape(end - start, self.cols)


def read_rows(fd: int, info: TensorInfo, start: int, end: int):
    """Rows ``[start, end)`` of the 2-D view of a float tensor, in the compute dtype (a new array)."""
    return RowReader(fd, info, end - start).read(start, end).copy()


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


def write_at(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def copy_range(src: int, dst: int, offset: int, count: int, dst_offset: int | None = None) -> None:
    """Copy ``count`` bytes at ``offset`` of ``src`` to ``dst_offset`` of ``dst`` (default: the same
    offset), in the kernel where it can."""
    to = offset if dst_offset is None else dst_offset
    done = 0
    while done < count:
        n = 0
        if hasattr(os, "copy_file_range"):
            try:
                n = os.copy_file_range(src, dst, min(count - done, 1 << 30), offset + done, to + done)
            except OSError:
                n = 0
        if n <= 0:  # no kernel copy here (other OS, file system, or EOF race): plain read/write
            block = os.pread(src, min(count - done, COPY_BLOCK), offset + done)
            if not block:
                fail("unexpected end of file while copying a shard; the input shard is truncated")
            write_at(dst, block, to + done)
            n = len(block)
        done += n


# A producer gets (input fd, tensor info, write(chunk, first_row, finite=False)) and writes every row.
Producer = Callable[[int, TensorInfo, Callable], None]
COPY_PIECE = 32 * 1024 * 1024  # the writer copies gaps in pieces this size, so edited chunks never wait long
QUEUE_CHUNKS = 32  # encoded chunks waiting for the writer (at most 32 x 1 MB in flight)


class _Cancelled(Exception):
    """The writer stopped (an error or Ctrl-C); the producers stop too."""


def patch_copy(src_path: str | os.PathLike, dst_path: str | os.PathLike,
               producers: dict[str, Producer] | Callable[[], dict[str, Producer]],
               progress: Callable[[int], None] | None = None, names: list[str] | None = None) -> None:
    """Write ``dst_path`` = ``src_path`` with the tensors in ``producers`` recomputed in place.

    Every byte outside the produced tensors is copied verbatim (header, offsets, metadata,
    padding). One writer thread does all the writing: it copies the gaps piece by piece in the
    kernel and writes the encoded chunks that the producers (worker threads) hand it in between.
    (Several threads writing one file contend for its inode lock, and the kernel spins on it: on
    2 cores that had cost more CPU than the edits.) ``producers`` may be a function returning the
    dict, called once the writer has started, with ``names`` listing the tensors it will produce:
    a caller's slow preparation (imports, vectors) then overlaps the copy. ``progress(n)`` gets
    the bytes done after each step (from the writer thread).
    """
    import queue
    import threading
    from concurrent.futures import ThreadPoolExecutor

    header = read_header(src_path)
    names = list(producers) if names is None else list(names)
    edited = sorted((header.tensors[name] for name in names), key=lambda info: info.begin)
    pieces, pos = [], 0
    for begin, end in [(info.begin, info.end) for info in edited] + [(header.size, header.size)]:
        pieces += [(at, min(COPY_PIECE, begin - at)) for at in range(pos, begin, COPY_PIECE)]
        pos = max(pos, end)
    chunks: queue.Queue = queue.Queue(maxsize=QUEUE_CHUNKS)
    spare: queue.SimpleQueue = queue.SimpleQueue()  # written buffers, reused (no page zeroing per chunk)
    stop, produced = threading.Event(), threading.Event()
    failed: list[BaseException] = []

    def put(item) -> None:
        while not stop.is_set():
            try:
                chunks.put(item, timeout=0.1)
                return
            except queue.Full:
                continue
        raise _Cancelled

    def writer() -> None:
        try:
            _write_all(dst, src, pieces, chunks, spare, stop, produced, progress)
        except BaseException as exc:  # handed to the calling thread
            failed.append(exc)
            stop.set()

    src = os.open(src_path, os.O_RDONLY)
    try:
        dst = os.open(dst_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(dst, header.size)
            thread = threading.Thread(target=writer, name="patch-writer")
            thread.start()
            pool = None
            try:
                made = producers() if callable(producers) else producers
                if sorted(made) != sorted(names):
                    raise ValueError(f"producers for {sorted(made)}, expected {sorted(names)}")
                pool = ThreadPoolExecutor(max_workers=workers())
                jobs = [pool.submit(_produce, src, info, made[info.name], put, spare) for info in edited]
                for job in jobs:
                    error = job.exception()
                    if error is not None and not failed:  # (after a writer error: its _Cancelled)
                        raise error
            except BaseException:  # a producer's error or Ctrl-C: stop the writer and the other producers
                stop.set()
                raise
            finally:  # (after the except: the producers are already told to stop when the pool is awaited)
                if pool is not None:
                    pool.shutdown()
                produced.set()
                thread.join()
            if failed:
                raise failed[0]
        finally:
            os.close(dst)
    finally:
        os.close(src)


def _write_all(dst: int, src: int, pieces: list[tuple[int, int]], chunks, spare, stop, produced, progress) -> None:
    """The writer: edited chunks first whenever some are ready, otherwise the next gap piece; it
    ends when every piece is copied and the producers are done (``produced``) with nothing queued."""
    import queue

    pieces = list(reversed(pieces))
    while not stop.is_set():
        try:
            offset, data, buffer = chunks.get_nowait() if pieces else chunks.get(timeout=0.05)
        except queue.Empty:
            if pieces:
                offset, count = pieces.pop()
                copy_range(src, dst, offset, count)
                if progress:
                    progress(count)
            elif produced.is_set() and chunks.empty():
                return
            continue
        write_at(dst, data, offset)
        spare.put(buffer)
        if progress:
            progress(len(data))
    raise _Cancelled


def workers() -> int:
    """Producer threads for one shard (numpy releases the GIL): one fewer than the CPUs, 1 to 8,
    since the writer, the slowest part on few cores, needs one of its own (measured on 2 cores:
    one producer 1.64-1.68x the time of cp, two 1.84-1.93x). ``ABLITERATE_THREADS`` sets it."""
    value = os.environ.get("ABLITERATE_THREADS", "")
    if value.isdigit() and int(value) > 0:
        return int(value)
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def _produce(src: int, info: TensorInfo, producer: Producer, put: Callable, spare) -> None:
    import queue

    import numpy as np

    _, cols = as_rows(info)
    storage, item = FLOAT_DTYPES[info.dtype]
    written = [0]
    scratch: list = []

    def buffer(size: int):  # a spare output buffer of at least ``size`` items, else a new one
        try:
            found = spare.get_nowait()
        except queue.Empty:
            found = None
        if found is None or found.dtype != storage or found.size < size:
            found = np.empty(max(size, CHUNK_ELEMENTS), dtype=storage)
        return found

    def write(chunk, first_row: int, finite: bool = False) -> None:
        out = buffer(chunk.size)
        if info.dtype == "BF16":
            if not scratch or scratch[0].size < chunk.size:
                scratch[:] = [np.empty(chunk.size, dtype=np.uint32)]
            data = encode(chunk, info.dtype, scratch[0], out, finite=finite)
        else:
            data = out[: chunk.size]
            np.copyto(data, chunk.reshape(-1), casting="unsafe")
        data = memoryview(data).cast("B")
        offset = info.begin + first_row * cols * item
        if offset < info.begin or offset + len(data) > info.end:
            raise ValueError(f"write outside tensor {info.name}")
        put((offset, data, out))
        written[0] += len(data)

    producer(src, info, write)
    if written[0] != info.nbytes:
        raise ValueError(f"tensor {info.name}: {written[0]} of {info.nbytes} bytes written")
