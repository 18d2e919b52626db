"""How arrays cross between the worker (numpy 2, torch) and the SPU parties (numpy 1, jax):
as builtins, (kind, dtype string, shape, bytes), which both numpy majors pickle the same way."""

from __future__ import annotations

from typing import Any


def pack(a: Any) -> tuple:
    """A numpy array as builtins (dtype string, shape, bytes): safe across numpy 1 and 2."""
    import numpy as np

    a = np.ascontiguousarray(a)
    return ("ndarray", a.dtype.str, tuple(int(d) for d in a.shape), a.tobytes())


def unpack(t: tuple) -> Any:
    import numpy as np

    kind, dtype, shape, data = t
    if kind != "ndarray":
        raise ValueError(f"not a packed array: {kind!r}")
    return np.frombuffer(data, dtype=np.dtype(dtype)).reshape(shape).copy()
