"""fakespotter: spot AI-synthesized faces by monitoring the neurons of a frozen face CNN.

Importing the package loads the native library, which registers ``torch.ops.fakespotter.*``.
"""

from __future__ import annotations

import torch  # noqa: F401  (the native library links against torch's; load it first)

from . import _C  # noqa: F401  (registers the ops)
from . import _meta  # noqa: F401  (their shape functions)
from .ops import layer_popcount, num_words, threshold_pack, threshold_pack_into, unpack_bits

__version__ = _C.build_info()["version"]

__all__ = [
    "__version__",
    "threshold_pack",
    "threshold_pack_into",
    "layer_popcount",
    "unpack_bits",
    "num_words",
]
