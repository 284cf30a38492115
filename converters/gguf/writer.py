"""Streaming, atomic GGUF output.

gguf-py's ``GGUFWriter`` writes the header, the key/value metadata and the
tensor-info table; tensor data is then streamed piece by piece (a block of rows
at a time) instead of being held in memory until the end. Every tensor's shape
and type is planned before the file is opened, which is what makes one pass
possible.

The file the writer fills is a staged output (``llmops.core.atomic``): it is renamed into
place only when complete (and, with ``--verify``, checked); any exception,
KeyboardInterrupt included, removes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import queue
import struct
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import gguf
import numpy as np

from llmops.converters.gguf.quantize import nbytes as q_nbytes
from llmops.core.atomic import start_writeback
from llmops.core.errors import LLMOpsError

QT = gguf.GGMLQuantizationType
_U64 = struct.Struct("<Q")
WRITEBACK_BYTES = 16 << 20  # written bytes handed to the disk at a time, ahead of the commit's fsync


class _Writer(gguf.GGUFWriter):
    """GGUFWriter with a fast path for long arrays (token lists, scores, merges).

    gguf-py packs arrays item by item, which costs most of a second for a 50k-token
    vocabulary; the bytes produced here are the same, packed in bulk.
    """

    _NP = {
        gguf.GGUFValueType.UINT8: "<u1", gguf.GGUFValueType.INT8: "<i1", gguf.GGUFValueType.UINT16: "<u2",
        gguf.GGUFValueType.INT16: "<i2", gguf.GGUFValueType.UINT32: "<u4", gguf.GGUFValueType.INT32: "<i4",
        gguf.GGUFValueType.FLOAT32: "<f4", gguf.GGUFValueType.UINT64: "<u8", gguf.GGUFValueType.INT64: "<i8",
        gguf.GGUFValueType.FLOAT64: "<f8",
    }

    def _pack_val(self, val, vtype, add_vtype, sub_type=None):  # type: ignore[no-untyped-def]
        if (vtype != gguf.GGUFValueType.ARRAY or self.endianess != gguf.GGUFEndian.LITTLE
                or not isinstance(val, (list, tuple)) or len(val) < 64):
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        first = gguf.GGUFValueType.get_type(val[0]) if sub_type is None else sub_type
        head = (struct.pack("<I", vtype) if add_vtype else b"")
        if first == gguf.GGUFValueType.STRING:
            try:
                enc = list(map(str.encode, val))  # UTF-8; the usual all-str list in one C-level pass
            except TypeError:
                if not all(isinstance(v, (str, bytes)) for v in val):
                    return super()._pack_val(val, vtype, add_vtype, sub_type)
                enc = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in val]
            # each string is its u64 length, then its bytes: interleaved by C-level iterators
            lens = map(_U64.pack, map(len, enc))
            return head + struct.pack("<IQ", first, len(val)) + b"".join(itertools.chain.from_iterable(zip(lens, enc)))
        if first in self._NP and all(gguf.GGUFValueType.get_type(v) is first for v in val[:1]):
            arr = np.asarray(val, dtype=self._NP[first])
            return head + struct.pack("<IQ", first, len(val)) + arr.tobytes()
        return super()._pack_val(val, vtype, add_vtype, sub_type)


class StreamingGGUFWriter:
    """Plan tensors, then :meth:`open`, then write each tensor's bytes in order."""

    def __init__(self, arch: str) -> None:
        self.w = _Writer(path=None, arch=arch)
        self.plan: list[tuple[str, tuple[int, ...], QT, int]] = []
        self._f: BinaryIO | None = None
        self._i = 0
        self._written = 0
        # file writes happen on a background thread so encoding the next block overlaps them
        self._q: queue.Queue[Any] = queue.Queue(maxsize=4)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._hash = hashlib.sha256()

    def add_tensor_plan(self, name: str, shape: Sequence[int], qtype: QT) -> None:
        """``shape`` in numpy order (rows first); stored reversed, as ggml's ne[]."""
        n = q_nbytes(qtype, tuple(shape)) if len(shape) else 0
        self.w.add_tensor_info(name, tuple(shape), np.dtype(np.float32), n, raw_dtype=qtype)
        self.plan.append((name, tuple(shape), qtype, n))

    def open(self, path: Path) -> None:
        self.w.write_header_to_file(path=path)
        self.w.write_kv_data_to_file()
        self.w.write_ti_data_to_file()
        assert self.w.fout is not None
        self._f = self.w.fout[0]
        self._pos = self._f.tell()
        # sha256 of the file as written: the header now, the data as it streams
        self._f.flush()
        with open(path, "rb") as hf:
            self._hash.update(hf.read(self._pos))
        # the thread gets the file itself: an abort (Ctrl-C) may close it and clear ``self._f``
        # before the new thread has run its first line
        self._thread = threading.Thread(target=self._drain, args=(self._f, self._f.fileno(), self._pos),
                                        name="llmops-gguf-writer",
                                        daemon=True)
        self._thread.start()
        self._pad()

    def _drain(self, f: BinaryIO, fd: int, start: int) -> None:
        synced = written = start
        while True:
            item = self._q.get()
            if item is None:
                return
            if self._error is None:
                try:
                    f.write(item)
                    self._hash.update(item)
                    written += len(item)
                    if written - synced >= WRITEBACK_BYTES:
                        f.flush()
                        start_writeback(fd, synced, written - synced)
                        synced = written
                except BaseException as e:  # noqa: BLE001 - re-raised in the producer
                    self._error = e

    def _put(self, item: Any) -> None:
        if self._error is not None:
            err = self._error
            raise LLMOpsError(f"cannot write the GGUF file: {getattr(err, 'strerror', None) or err}")
        self._q.put(item)

    def _pad(self) -> None:
        pad = gguf.GGUFWriter.ggml_pad(self._pos, self.w.data_alignment) - self._pos
        if pad:
            self._put(b"\0" * pad)
            self._pos += pad

    def write(self, data: np.ndarray) -> None:
        """Append bytes of the current tensor."""
        assert self._f is not None
        buf = np.ascontiguousarray(data)
        self._put(memoryview(buf).cast("B"))
        self._written += buf.nbytes
        self._pos += buf.nbytes

    @property
    def sha256(self) -> str:
        """Hex digest of everything written (valid after :meth:`close`)."""
        return self._hash.hexdigest()

    def _join(self) -> None:
        if self._thread is not None:
            self._q.put(None)
            self._thread.join()
            self._thread = None

    def end_tensor(self) -> None:
        name, _, _, n = self.plan[self._i]
        if self._written != n:
            raise LLMOpsError(f"internal error: tensor {name} got {self._written} bytes, planned {n}")
        self._i += 1
        self._written = 0
        self._pad()

    def close(self) -> None:
        self._join()
        if self._error is not None:
            err = self._error
            raise LLMOpsError(f"cannot write the GGUF file: {getattr(err, 'strerror', None) or err}")
        if self._f is not None:
            if self._i != len(self.plan):
                raise LLMOpsError(f"internal error: {self._i} of {len(self.plan)} tensors written")
            self._f.flush()
        self.w.close()
        self._f = None

    def abort(self) -> None:
        self._error = self._error or RuntimeError("aborted")
        with contextlib.suppress(BaseException):
            self._join()
        with contextlib.suppress(Exception):
            self.w.close()
        self._f = None
