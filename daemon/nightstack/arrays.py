"""The ndarray type aliases every module annotates with: one set, at the bottom of the imports.

``FloatArray`` is any float dtype (most stages work in float32, some sums in float64);
the others name one dtype exactly.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.floating]
BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.intp]
UInt16Array = npt.NDArray[np.uint16]
Float32Array = npt.NDArray[np.float32]
Float64Array = npt.NDArray[np.float64]
