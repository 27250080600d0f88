"""safetensors files read and written one tensor at a time, with plain file I/O.

Why not ``safe_open``: it memory-maps the file, and every page a read touches stays in the
process's resident set (RSS) while the file is open, so reading a 16 GB model through one
handle makes the process 16 GB large. Here each tensor is read with ``pread`` into memory
of its own, which is freed with the tensor; the page cache holds the file, not the process.

:class:`TensorFiles` is a read-only mapping from tensor name to tensor over one or more
files (a model, a checkpoint, the work directory's finished layers); headers are checked
by ``safe_open`` when the mapping is made. :func:`write_safetensors` writes a file from
tensors that are produced one at a time, byte for byte what ``safetensors.torch.save_file``
writes for the same tensors (tested), so a checkpoint never has to be whole in memory.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from safetensors import safe_open

T = TypeVar("T")

DTYPES = {  # safetensors name -> torch dtype
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I32": torch.int32,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
}
NAMES = {v: k for k, v in DTYPES.items()}
# safetensors orders a file's tensors by dtype, in its own enum's order from last to
# first, then by name; these are the positions in that enum (safetensors 0.4 to 0.8)
_ORDER = {"BOOL": 0, "U8": 4, "I8": 5, "I16": 9, "F16": 11, "BF16": 12, "I32": 13}
_ORDER |= {"F32": 15, "F64": 17, "I64": 18}


@dataclass(frozen=True)
class Entry:
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # byte offset in the file
    nbytes: int


def read_header(path: Path) -> dict:
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        return json.loads(fh.read(n)), 8 + n


class TensorFiles(Mapping):
    """Tensors of safetensors ``files`` by name, each read from disk when asked for."""

    def __init__(self, files: list[Path]) -> None:
        self.entries: dict[str, Entry] = {}
        for path in files:
            with safe_open(str(path), framework="pt"):  # refuses corrupt or truncated files
                pass
            header, base = read_header(path)
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                start, end = info["data_offsets"]
                self.entries[key] = Entry(
                    Path(path),
                    DTYPES[info["dtype"]],
                    tuple(info["shape"]),
                    base + start,
                    end - start,
                )

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.read(key)

    def read(self, key: str, pool: Executor | None = None, chunk: int = 64 << 20) -> torch.Tensor:
        """Tensor ``key``; with ``pool``, its chunks of ``chunk`` bytes are read by the
        pool's threads at once (``pread`` releases the interpreter's lock: a 1 GB embedding
        from the page cache is read several times faster than by one thread)."""
        e = self.entries[key]
        out = torch.empty(e.nbytes, dtype=torch.uint8)
        if e.nbytes:
            view = memoryview(out.numpy())
            if pool is None or e.nbytes <= chunk:
                _pread(e, key, view, 0, e.nbytes)
            else:
                parts = [
                    pool.submit(_pread, e, key, view, at, min(chunk, e.nbytes - at))
                    for at in range(0, e.nbytes, chunk)
                ]
                for part in parts:
                    part.result()
        return out.view(e.dtype).view(e.shape) if e.shape else out.view(e.dtype).reshape(())

    def map_chunks(
        self, key: str, fn: Callable[[torch.Tensor], T], pool: Executor, chunk: int = 64 << 20
    ) -> list[T]:
        """``fn`` of each ``chunk``-byte piece of tensor ``key`` (flat, in its dtype), each
        piece read and passed to ``fn`` by one of the pool's threads: a scan of a large
        tensor that never holds the whole of it. ``chunk`` is rounded down to whole
        elements."""
        e = self.entries[key]
        size = e.dtype.itemsize
        chunk = max(size, chunk - chunk % size)

        def one(at: int) -> T:
            n = min(chunk, e.nbytes - at)
            buf = torch.empty(n, dtype=torch.uint8)
            _pread(e, key, memoryview(buf.numpy()), 0, n, offset=at)
            return fn(buf.view(e.dtype))

        return [f.result() for f in [pool.submit(one, at) for at in range(0, e.nbytes, chunk)]]

    def read_into(self, key: str, out: torch.Tensor, staging: list[torch.Tensor]) -> None:
        """Copy tensor ``key``'s bytes into ``out`` (a CUDA ``uint8`` tensor of its size)
        through ``staging``, pinned host buffers used in turn: each chunk is read from the
        file into one (``pread`` straight into page-locked memory) and copied to the device
        asynchronously on the current stream while the next chunk is read into the other.
        Copies from ordinary (pageable) host memory are staged by the driver and, measured
        on an H200, did not overlap the compute stream's kernels. Returns once the last
        chunk has left the buffers; the caller synchronizes the stream (or waits for it)
        before ``out`` is used on another."""
        e = self.entries[key]
        events: list[torch.cuda.Event | None] = [None] * len(staging)
        with open(e.path, "rb", buffering=0) as fh:
            done, k = 0, 0
            while done < e.nbytes:
                buf = staging[k]
                if events[k] is not None:
                    events[k].synchronize()  # its last copy has left the buffer
                n = min(buf.numel(), e.nbytes - done)
                view = memoryview(buf.numpy())[:n]
                got = 0
                while got < n:
                    m = os.preadv(fh.fileno(), [view[got:]], e.start + done + got)
                    if m <= 0:
                        raise OSError(f"{e.path} ended inside tensor {key}")
                    got += m
                out[done : done + n].copy_(buf[:n], non_blocking=True)
                events[k] = torch.cuda.Event()
                events[k].record()
                done += n
                k = (k + 1) % len(staging)
        for event in events:  # the buffers are free for the next tensor
            if event is not None:
                event.synchronize()

    def meta(self, key: str) -> torch.Tensor | None:
        """A tensor of ``key``'s dtype and shape on the meta device, without reading it."""
        e = self.entries.get(key)
        return None if e is None else torch.empty(e.shape, dtype=e.dtype, device="meta")

    def __contains__(self, key: object) -> bool:  # Mapping's own would read the tensor
        return key in self.entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)


def _pread(e: Entry, key: str, view: memoryview, at: int, n: int, offset: int = 0) -> None:
    """Bytes ``offset + at:offset + at + n`` of tensor ``e`` into ``view[at:at + n]``."""
    with open(e.path, "rb", buffering=0) as fh:
        done = 0
        while done < n:
            got = os.preadv(fh.fileno(), [view[at + done : at + n]], e.start + offset + at + done)
            if got <= 0:
                raise OSError(f"{e.path} ended inside tensor {key}")
            done += got


@dataclass(frozen=True)
class Pending:
    """A tensor to write, made by ``make`` only when its turn comes."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    make: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


def pending(tensor: torch.Tensor) -> Pending:
    return Pending(tensor.dtype, tuple(tensor.shape), lambda: tensor)


def can_stream(items: Mapping[str, Pending]) -> bool:
    return all(p.dtype in NAMES for p in items.values())


def write_safetensors(
    path: Path, items: Mapping[str, Pending], metadata: dict[str, str] | None = None
) -> None:
    """Write ``items`` as ``save_file`` would, making and writing one tensor at a time."""
    order = sorted(items, key=lambda k: (-_ORDER[NAMES[items[k].dtype]], k))
    header: dict = {} if metadata is None else {"__metadata__": metadata}
    offset = 0
    for key in order:
        p = items[key]
        header[key] = {
            "dtype": NAMES[p.dtype],
            "shape": list(p.shape),
            "data_offsets": [offset, offset + p.nbytes],
        }
        offset += p.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(text)))
        fh.write(text)
        for key in order:
            p = items[key]
            t = p.make().detach().to("cpu").contiguous()
            if t.dtype != p.dtype or tuple(t.shape) != p.shape:
                raise ValueError(f"{key}: made {t.dtype} {list(t.shape)}, announced otherwise")
            if t.numel():
                fh.write(memoryview(t.view(-1).view(torch.uint8).numpy()))
            del t


def described(tensors: Mapping[str, torch.Tensor], key: str) -> torch.Tensor | None:
    """``tensors.get(key)`` where only its dtype and shape will be looked at: not read
    from disk when ``tensors`` is a :class:`TensorFiles`."""
    return tensors.meta(key) if isinstance(tensors, TensorFiles) else tensors.get(key)
