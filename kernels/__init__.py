"""iqdb's compute layer: flat top-k kernels over an array namespace (NumPy on the CPU, CuPy on the GPU).

>>> from iqdb.kernels import cpu_backend
>>> cpu_backend().name
'cpu'

This package is the only code that knows which array library runs. Algorithms live in
:mod:`._flat` (the adaptive driver, for CPUs) and :mod:`._fixed` (the fixed-shape driver, for
GPUs: two host syncs per query block), and take the namespace ``xp`` as an argument; a *backend*
binds a namespace to a device, says which driver it runs and carries its tuning
:class:`Profile` (:data:`CPU_PROFILE`, :data:`GPU_PROFILE`). Nothing here imports :mod:`iqdb`
(imports flow handle -> storage -> kernels).
"""

from __future__ import annotations

from ._backend import ArrayBackend, cpu_backend, gpu_backend
from ._fixed import fixed_topk
from ._flat import SearchOutput, canonical_sum, exact_scores, flat_topk
from ._parallel import SERIAL
from ._profile import CPU_PROFILE, DEFAULT_WORKING_SET, GPU_PROFILE, Profile

__all__ = [
    "CPU_PROFILE",
    "DEFAULT_WORKING_SET",
    "GPU_PROFILE",
    "SERIAL",
    "ArrayBackend",
    "Profile",
    "SearchOutput",
    "canonical_sum",
    "cpu_backend",
    "exact_scores",
    "fixed_topk",
    "flat_topk",
    "gpu_backend",
]
