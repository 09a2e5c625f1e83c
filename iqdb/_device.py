"""Device choice: which array backend runs search.

>>> from iqdb._device import parse_device, resolve_device
>>> resolve_device("cpu").name
'cpu'
>>> parse_device(" CUDA:1 ")
('cuda', 1)

Spellings (case-insensitive, surrounding whitespace ignored):

- ``"cpu"``: NumPy. CuPy is never imported, here or by ``import iqdb``.
- ``"gpu"``, ``"cuda"`` (both mean ``"cuda:0"``) and ``"cuda:N"``: CuPy on CUDA device N. When CuPy
  is missing, older than 14, or the device does not answer, this raises
  :class:`DeviceUnavailable` with the reason and the install hint (``pip install "iqdb[gpu]"``);
  an explicit GPU request never falls back to the CPU.
- ``"auto"`` (the handle's default): ``cuda:0`` when CuPy 14+ imports and that device answers a
  tiny allocation and kernel, else the CPU. The probe runs once per process; its choice is logged
  once under the ``iqdb`` logger, with the reason when it falls back (INFO when CuPy is not
  installed, WARNING when CuPy is there but unusable).

The ``IQDB_DEVICE`` environment variable, when set and not empty, takes the place of ``"auto"``;
an explicit argument other than ``"auto"`` wins over it. A value that is not a spelling above
raises :class:`InvalidConfig` naming the variable. Any other ``device`` string raises
:class:`InvalidConfig` too.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._errors import DeviceUnavailable, InvalidConfig, InvalidVector
from .kernels import ArrayBackend, cpu_backend, gpu_backend

__all__ = ["ENV_VAR", "INSTALL_HINT", "MIN_CUPY_MAJOR", "device_queries", "parse_device", "resolve_device"]

ENV_VAR = "IQDB_DEVICE"
INSTALL_HINT = 'pip install "iqdb[gpu]"'
# CuPy 13 lacks NumPy 2's scalar promotion rules (NEP 50), which the kernels rely on for dtypes.
MIN_CUPY_MAJOR = 14

_CUDA = re.compile(r"^cuda:(\d+)$")
_EXPECTED = "expected 'auto', 'cpu', 'gpu', 'cuda' or 'cuda:N'"

log = logging.getLogger("iqdb")


def parse_device(device: object) -> tuple[str, int | None]:
    """Split a device spelling into ``("auto"|"cpu"|"cuda", index)``.

    ``"gpu"`` and ``"cuda"`` give index 0; ``"auto"`` and ``"cpu"`` give ``None``.

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
    raise InvalidConfig(f"unknown device {device!r}; {_EXPECTED}")


@dataclass(frozen=True)
class _Verdict:
    """Whether one CUDA device is usable: ``reason`` is ``None`` when it is."""

    reason: str | None
    cause: BaseException | None = None
    # CuPy is simply not installed: the user never asked for a GPU, so auto's fallback is routine.
    absent: bool = False


# The probe's results for this process: one for CuPy itself (import, version, device count), one
# per device index (a tiny allocation and kernel). Probing initialises CUDA, which takes from
# milliseconds to seconds, so no open after the first pays for it again.
_lock = threading.Lock()
_runtime: tuple[int, _Verdict] | None = None
_devices: dict[int, _Verdict] = {}
_auto_logged = False


def _reset_probe() -> None:
    """Forget the probe's results and the auto log line (tests only)."""
    global _runtime, _auto_logged
    with _lock:
        _runtime = None
        _devices.clear()
        _auto_logged = False


def _cupy_major(version: str) -> int | None:
    match = re.match(r"\s*(\d+)", version)
    return int(match.group(1)) if match else None


def _probe_runtime() -> tuple[int, _Verdict]:
    """``(device count, verdict)`` for CuPy as installed; call with ``_lock`` held."""
    global _runtime
    if _runtime is not None:
        return _runtime
    count, verdict = 0, _Verdict(None)
    try:
        import cupy
    except ModuleNotFoundError as exc:
        if exc.name != "cupy":  # CuPy is there but one of its own imports is missing
            verdict = _Verdict(f"CuPy failed to import: {exc}", exc)
        else:
            verdict = _Verdict("CuPy is not installed", exc, absent=True)
    except Exception as exc:  # a broken CUDA install can fail CuPy's import in many ways
        verdict = _Verdict(f"CuPy failed to import: {exc}", exc)
    else:
        version = str(getattr(cupy, "__version__", "unknown"))
        major = _cupy_major(version)
        if major is None or major < MIN_CUPY_MAJOR:
            verdict = _Verdict(
                f"CuPy {version} is too old: iqdb needs CuPy {MIN_CUPY_MAJOR} or later "
                "(NumPy 2 scalar promotion)"
            )
        else:
            try:
                count = int(cupy.cuda.runtime.getDeviceCount())
            except Exception as exc:  # CUDARuntimeError without a driver, and its kin
                verdict = _Verdict(f"no CUDA device: {exc}", exc)
            else:
                if count <= 0:
                    verdict = _Verdict("no CUDA device: the CUDA runtime reports 0 devices")
    _runtime = (count, verdict)
    return _runtime


def _probe(index: int) -> _Verdict:
    """Whether CUDA device ``index`` is usable by iqdb; cached; call with ``_lock`` held."""
    known = _devices.get(index)
    if known is not None:
        return known
    count, verdict = _probe_runtime()
    if verdict.reason is None:
        if index >= count:
            verdict = _Verdict(
                f"device index {index} is out of range: this machine has {count} CUDA device(s) "
                f"(cuda:0 to cuda:{count - 1})"
            )
        else:
            verdict = _try_device(index)
    _devices[index] = verdict
    return verdict


def _try_device(index: int) -> _Verdict:
    # A device that is listed can still be unusable (busy in exclusive mode, out of memory, no
    # kernel image for its architecture, no NVRTC): a tiny allocation and one kernel find out.
    import cupy

    try:
        with cupy.cuda.Device(index):
            x = cupy.zeros(4, dtype=cupy.float32)
            x += 1
            answered = float(x.sum())
    except Exception as exc:
        return _Verdict(f"CUDA device {index} does not answer: {exc}", exc)
    if answered != 4.0:
        return _Verdict(f"CUDA device {index} does not answer: a test sum gave {answered}, not 4.0")
    return _Verdict(None)


def _explicit_gpu(index: int, spelled: str) -> ArrayBackend:
    with _lock:
        verdict = _probe(index)
    if verdict.reason is not None:
        raise DeviceUnavailable(
            f"device {spelled} asked for a GPU, but cuda:{index} is not usable: {verdict.reason}. "
            f"GPU search needs CuPy {MIN_CUPY_MAJOR}+ and a CUDA device: {INSTALL_HINT} "
            '(CUDA 12 driver) or pip install "iqdb[gpu-cuda13]" (CUDA 13); '
            "or use device='cpu' or 'auto'"
        ) from verdict.cause
    return gpu_backend(index)


def _auto() -> ArrayBackend:
    global _auto_logged
    with _lock:
        verdict = _probe(0)
        first, _auto_logged = not _auto_logged, True
    if verdict.reason is None:
        if first:
            log.info("iqdb device='auto' chose cuda:0 (CuPy and a CUDA device are available)")
        return gpu_backend(0)
    if first:
        # Someone who installed CuPy meant to use the GPU: tell them loudly why it is not used.
        level = logging.INFO if verdict.absent else logging.WARNING
        log.log(level, "iqdb device='auto' chose the CPU: %s", verdict.reason)
    return cpu_backend()


def _from_environment(device: object) -> tuple[str, int | None, str]:
    """The parsed choice and how to name it: ``device``, or ``IQDB_DEVICE`` in place of ``"auto"``."""
    kind, index = parse_device(device)
    if kind != "auto":
        return kind, index, repr(device)
    value = os.environ.get(ENV_VAR, "")
    if not value.strip():
        return kind, index, repr(device)
    try:
        kind, index = parse_device(value)
    except InvalidConfig:
        raise InvalidConfig(
            f"environment variable {ENV_VAR}={value!r} is not a device; {_EXPECTED}"
        ) from None
    return kind, index, f"{value!r} (from {ENV_VAR})"


def resolve_device(device: object) -> ArrayBackend:
    """The backend for a device spelling (``IQDB_DEVICE`` stands in for ``"auto"`` when set).

    Parameters
    ----------
    device
        ``"auto"``, ``"cpu"``, ``"gpu"``, ``"cuda"`` or ``"cuda:N"``.

    Returns
    -------
    ArrayBackend
        NumPy (``name="cpu"``) or CuPy on one device (``name="cuda:N"``, ``device_index=N``).

    Raises
    ------
    InvalidConfig
        An unknown spelling, in ``device`` or in ``IQDB_DEVICE``.
    DeviceUnavailable
        A GPU spelling (explicit, or from ``IQDB_DEVICE``) and that device is not usable: CuPy
        missing or older than 14, no CUDA device, or the index out of range.
    """
    kind, index, spelled = _from_environment(device)
    if kind == "cpu":
        log.debug("iqdb device=%s: cpu", spelled)
        return cpu_backend()
    if kind == "cuda":
        assert index is not None
        backend = _explicit_gpu(index, spelled)
        log.debug("iqdb device=%s: %s", spelled, backend.name)
        return backend
    return _auto()


def device_queries(backend: ArrayBackend, obj: object, ndim: int) -> Any:
    """``obj`` as a private float32 array on ``backend``'s device, checked, when it already lives
    on a GPU (a CuPy array, or anything with ``__cuda_array_interface__`` or a CUDA DLPack
    capsule: a PyTorch CUDA tensor, say) and search runs on one: used there, with no trip
    through the host. ``None`` for anything else (the host path takes it).

    Raises
    ------
    InvalidVector
        Not ``ndim``-D, empty, not real numbers, or holding NaN or an infinity.
    """
    xp = backend.xp
    if xp is np or not _on_cuda(obj, xp):
        return None
    with backend.device():
        if isinstance(obj, xp.ndarray) or hasattr(obj, "__cuda_array_interface__"):
            arr = xp.asarray(obj)
        else:
            arr = xp.from_dlpack(obj)
        if arr.dtype.kind not in "fiu":
            raise InvalidVector(f"vector data must be real numbers, got dtype {arr.dtype}")
        if arr.ndim != ndim:
            shape = "1-D" if ndim == 1 else "2-D (one vector per row)"
            raise InvalidVector(f"queries must be {shape}, got an array of shape {tuple(arr.shape)}")
        if arr.shape[-1] == 0:
            raise InvalidVector("vector is empty")
        # A private copy first, then the check on the copy (the caller's array may change).
        out = arr.astype(xp.float32, copy=True)
        if not bool(xp.isfinite(out).all()):
            raise InvalidVector("vector contains a non-finite value")
        return out


def _on_cuda(obj: object, xp: Any) -> bool:
    if isinstance(obj, xp.ndarray) or hasattr(obj, "__cuda_array_interface__"):
        return True
    where = getattr(obj, "__dlpack_device__", None)
    if where is None:
        return False
    try:
        kind = where()[0]
    except Exception:
        return False
    return int(kind) in (2, 13)  # kDLCUDA, kDLCUDAManaged
