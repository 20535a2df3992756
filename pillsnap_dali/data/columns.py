"""Compact, read-only-to-consumers columns for the in-memory :class:`~pillsnap_dali.data.manifest.Manifest`.

A manifest row held as ten Python objects cost about 1.35 KB (541 MB for 400,000 training rows, on every
rank). These columns keep the same values in flat buffers, and behave as sequences of them: ``len``,
indexing (negative too), slices (a list), iteration, ``in``, ``index``, ``count``, and ``==`` with any
sequence of the same values.

* :class:`Interned`: few distinct values (K-codes, image types, sources): one small int per row + a table.
* :class:`Packed`: mostly distinct strings (paths, combination ids): UTF-8 bytes in one buffer; with
  ``split_dirs`` the part up to the last ``/`` is interned (the folders repeat, the file names do not).
* :class:`JsonPacked`: JSON values (the boxes) kept as their text, parsed when a row is read.
* :class:`Pairs` (width, height) and :class:`Ints` (the file's row numbers): machine ints.

Each has ``append`` (how a reader fills it) and ``take(indices)`` (a new column of those rows, without
going through Python objects where it can).
"""
from __future__ import annotations

import json
import operator
from array import array
from collections.abc import Iterable, Sequence

import numpy as np


class _Column(Sequence):
    __slots__ = ()

    def _get(self, i: int):
        raise NotImplementedError

    def _row(self, i) -> int:
        i, n = operator.index(i), len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"row {i} of {n}")
        return i

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._get(j) for j in range(*i.indices(len(self)))]
        return self._get(self._row(i))

    def __iter__(self):
        return (self._get(i) for i in range(len(self)))

    def __eq__(self, other) -> bool:
        if not isinstance(other, (Sequence, np.ndarray)) or isinstance(other, (str, bytes)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # mutable (append)

    def __repr__(self) -> str:
        head = ", ".join(repr(v) for v in self[:3])
        return f"{type(self).__name__}([{head}{', ...' if len(self) > 3 else ''}], {len(self)} rows)"

    def extend(self, values: Iterable) -> None:
        for v in values:
            self.append(v)

    @classmethod
    def of(cls, values: Iterable, **kw):
        """``values`` as this column (the column itself when it already is one: no copy)."""
        if type(values) is cls and not kw:
            return values
        col = cls(**kw)
        col.extend(values)
        return col


def _index_array(idx) -> np.ndarray:
    return np.asarray(list(idx) if not isinstance(idx, (np.ndarray, list, range)) else idx, dtype=np.int64)


class Interned(_Column):
    """Few distinct strings: a ``uint32`` id per row into a table of the distinct values."""
    __slots__ = ("_ids", "_table", "_lookup")

    def __init__(self):
        self._ids, self._table, self._lookup = array("I"), [], {}

    def append(self, value: str) -> None:
        i = self._lookup.get(value)
        if i is None:
            i = self._lookup[value] = len(self._table)
            self._table.append(value)
        self._ids.append(i)

    def __len__(self) -> int:
        return len(self._ids)

    def _get(self, i: int):
        return self._table[self._ids[i]]

    def __iter__(self):
        return map(self._table.__getitem__, self._ids)

    @property
    def table(self) -> list:
        """The distinct values the rows have."""
        return self._table

    def ids(self) -> np.ndarray:
        """Each row's index into ``table`` (a read-only view)."""
        return np.frombuffer(self._ids, dtype=np.uint32) if len(self._ids) else np.zeros(0, np.uint32)

    def take(self, idx) -> "Interned":
        """The rows ``idx``; its table holds only the values they have."""
        used, ids = np.unique(self.ids()[_index_array(idx)], return_inverse=True)
        out = Interned()
        out._table = [self._table[u] for u in used.tolist()]
        out._lookup = {v: i for i, v in enumerate(out._table)}
        out._ids = array("I", ids.astype(np.uint32).tobytes())
        return out


class Packed(_Column):
    """Mostly distinct strings as UTF-8 in one buffer (``surrogatepass``: any ``str`` comes back as it was);
    ``split_dirs``: the part up to the last ``/`` of each value is interned."""
    __slots__ = ("_buf", "_ends", "_dirs", "split_dirs")

    def __init__(self, split_dirs: bool = False):
        self.split_dirs = split_dirs
        self._buf, self._ends = bytearray(), array("q")
        self._dirs = Interned()

    def append(self, value: str) -> None:
        head, name = "", value
        if self.split_dirs:
            cut = value.rfind("/") + 1
            head, name = value[:cut], value[cut:]
        self._dirs.append(head)
        self._buf += name.encode("utf-8", "surrogatepass")
        self._ends.append(len(self._buf))

    def __len__(self) -> int:
        return len(self._ends)

    def _get(self, i: int):
        start = self._ends[i - 1] if i else 0
        return self._dirs._get(i) + self._buf[start:self._ends[i]].decode("utf-8", "surrogatepass")

    def __iter__(self):
        buf, start = self._buf, 0
        for head, end in zip(self._dirs, self._ends):
            yield head + buf[start:end].decode("utf-8", "surrogatepass")
            start = end

    def take(self, idx) -> "Packed":
        idx = _index_array(idx)
        ends = np.frombuffer(self._ends, dtype=np.int64) if len(self) else np.zeros(0, np.int64)
        starts = np.concatenate([[0], ends[:-1]]) if len(self) else ends
        out = type(self)(self.split_dirs)
        view = memoryview(self._buf)
        out._buf = bytearray(b"".join(view[s:e] for s, e in zip(starts[idx].tolist(), ends[idx].tolist())))
        out._ends = array("q", np.cumsum(ends[idx] - starts[idx], dtype=np.int64).tobytes())
        out._dirs = self._dirs.take(idx)
        return out


class JsonPacked(Packed):
    """JSON values (the rows' boxes) kept as text; a row reads back as a fresh parsed value, ``[]`` when its
    text is empty. ``append`` takes a value (stored as ``json.dumps``), ``append_text`` the text as read."""
    __slots__ = ()

    def __init__(self, split_dirs: bool = False):
        super().__init__(False)

    def append(self, value) -> None:
        self.append_text(json.dumps(value, ensure_ascii=False, separators=(",", ":")) if value else "")

    def append_text(self, text: str) -> None:
        Packed.append(self, text)

    def text(self, i: int) -> str:
        """Row ``i``'s JSON text as stored."""
        return Packed._get(self, self._row(i))

    def _get(self, i: int):
        text = Packed._get(self, i)
        return json.loads(text) if text else []

    def __iter__(self):
        return (json.loads(t) if t else [] for t in Packed.__iter__(self))


class Ints(_Column):
    """Python ints as ``int64``."""
    __slots__ = ("_a",)

    def __init__(self):
        self._a = array("q")

    def append(self, value: int) -> None:
        self._a.append(int(value))

    def __len__(self) -> int:
        return len(self._a)

    def _get(self, i: int):
        return self._a[i]

    def __iter__(self):
        return iter(self._a)

    def take(self, idx) -> "Ints":
        out = Ints()
        out._a = array("q", np.frombuffer(self._a, dtype=np.int64)[_index_array(idx)].tobytes()) if len(self) \
            else array("q")
        return out


class Pairs(_Column):
    """(int, int) tuples (image width, height) as two ``int32`` per row."""
    __slots__ = ("_a",)

    def __init__(self):
        self._a = array("i")

    def append(self, value) -> None:
        w, h = value
        self._a.extend((int(w), int(h)))

    def __len__(self) -> int:
        return len(self._a) // 2

    def _get(self, i: int):
        return self._a[2 * i], self._a[2 * i + 1]

    def take(self, idx) -> "Pairs":
        out = Pairs()
        if len(self):
            pairs = np.frombuffer(self._a, dtype=np.int32).reshape(-1, 2)[_index_array(idx)]
            out._a = array("i", np.ascontiguousarray(pairs).tobytes())
        return out

