"""Device choice: which array backend runs search.

>>> from iqdb._device import resolve_device
>>> resolve_device("auto").name
'cpu'

``"auto"`` and ``"cpu"`` run on NumPy. ``"gpu"``, ``"cuda"`` and ``"cuda:N"`` ask for a CUDA
device through CuPy; this version has no GPU path yet, so they raise
:class:`DeviceUnavailable` (with what to install) and never fall back silently. Any other
string raises :class:`InvalidConfig`. CuPy is never imported by ``import iqdb``.
"""

from __future__ import annotations

import re

from ._errors import DeviceUnavailable, InvalidConfig
from .kernels import ArrayBackend, cpu_backend

__all__ = ["parse_device", "resolve_device"]

_CUDA = re.compile(r"^cuda:(\d+)$")


def parse_device(device: object) -> tuple[str, int | None]:
    """Split a device spelling into ``("auto"|"cpu"|"cuda", index)``.

    Raises
    ------
    InvalidConfig
        Not one of ``"auto"``, ``"cpu"``, ``"gpu"``, ``"cuda"``, ``"cuda:N"``.
    """
    if not isinstance(device, str):
        raise InvalidConfig(f"device must be a string, got {type(device).__name__}")
    spelled = device.strip().lower()
    if spelled in ("auto", "cpu"):
        return spelled, None
    if spelled in ("gpu", "cuda"):
        return "cuda", 0
    match = _CUDA.match(spelled)
    if match:
        return "cuda", int(match.group(1))
    raise InvalidConfig(f"unknown device {device!r}; expected 'auto', 'cpu', 'gpu', 'cuda' or 'cuda:N'")


def resolve_device(device: object) -> ArrayBackend:
    """The backend for a device spelling.

    Raises
    ------
    InvalidConfig
        An unknown spelling.
    DeviceUnavailable
        A GPU spelling: no usable GPU path on this machine.
    """
    kind, _index = parse_device(device)
    if kind == "cuda":
        raise DeviceUnavailable(
            f"device {device!r} asked for a GPU, but this iqdb build has no GPU search path yet "
            "(it will use CuPy: pip install 'iqdb[gpu]'); use device='cpu' or 'auto'"
        )
    return cpu_backend()
