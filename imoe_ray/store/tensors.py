"""Arrays to and from safetensors bytes.

safetensors writes an array's buffer as row-major bytes; scikit-learn often returns column-major
(Fortran-ordered) arrays, which would come back transposed-in-memory garbage. Everything goes
through `np.ascontiguousarray` first.
"""

from __future__ import annotations

import numpy as np
from safetensors.numpy import load, save


def arrays_to_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    return save({name: np.ascontiguousarray(value) for name, value in arrays.items()})


def arrays_from_bytes(data: bytes) -> dict[str, np.ndarray]:
    return load(data)
