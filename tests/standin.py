"""A CuPy-like device namespace on the CPU, so CI (no GPU) runs the GPU orchestration (a helper module).

>>> import numpy as np
>>> from standin import ledger, xp
>>> with ledger.record() as t:
...     a = xp.asarray(np.arange(4.0))  # one upload
...     s = float((a * 2).sum())  # a device scalar read on the host: a sync and a download
>>> s, t.uploads, t.downloads, t.syncs
(12.0, 1, 1, 1)
>>> np.asarray(a)
Traceback (most recent call last):
TypeError: Implicit conversion to a NumPy array is not allowed. Please use `.get()` to construct a NumPy array explicitly.

``xp`` behaves like CuPy 14 where the kernels' portability depends on it (research note
``shared/research/gpu-testing.md`` section 1; names and signatures from the cupy-cuda12x 14.2.0
wheel):

* Device arrays (:class:`ndarray`) *wrap* a NumPy array (a subclass would keep the buffer protocol,
  and ``np.asarray`` would succeed quietly). ``__array__`` and ``__dlpack__`` raise ``TypeError``:
  no implicit host conversion. A host ``ndarray`` operand of a ufunc or function raises
  ``TypeError`` as in CuPy (``Unsupported type``).
* Every host-device transfer and host wait is an :class:`Event` in the :data:`ledger`, with its
  call site (the first frame in ``kernels/`` or ``iqdb/``): ``xp.asarray(host)`` and
  ``ndarray.set`` upload; ``.get()``, ``.tolist()``, ``.item()``, ``.tobytes()``, ``asnumpy`` and
  ``float()``/``int()``/``bool()``/``complex()``/``repr()``/``format()`` of a device array download
  (each also a sync); shapes that depend on the data sync (``nonzero``, ``flatnonzero``,
  ``argwhere``, one-argument ``where``, ``compress``, ``extract``, ``unique`` and the set
  functions, ``delete``, ``repeat`` by an array, boolean-mask get and set; ``bincount`` twice, as
  CuPy runs ``(x < 0).any()`` and ``int(max(x))``). A host index or setitem value, or a Python
  scalar ``v`` of ``searchsorted``, is uploaded quietly, as CuPy does: counted as a *quiet* upload.
* CuPy's semantics where they differ: only names CuPy has (no ``errstate``; CuPy names NumPy 2
  dropped are left out), calls checked against CuPy's signatures (``einsum`` has no ``out=``,
  ufuncs take only ``out``, ``dtype``, ``casting``); ``sort``/``argsort`` take ``kind`` None or
  ``'stable'`` and are always stable; ``argpartition`` is a full stable argsort; ``partition``
  does not order NaN (CuPy's bitonic kernel compares with ``<``): this one ranks NaN *first*, so
  code that relies on NaN placement gets wrong answers here; reductions and integer indexing
  give 0-d device arrays; floating-point errors are never signalled. Stricter than CuPy: an
  out-of-bounds index raises NumPy's ``IndexError`` (CuPy wraps it).
* Page-locked memory: ``cuda.alloc_pinned_memory`` gives a host block the ledger knows, and an
  upload records whether it read from one (``Tally.pageable_upload_bytes``). ``asarray`` of a host
  array records the page-locked staging block of its whole size that CuPy allocates for it
  (``Tally.pinned_peak``). ``cuda.Stream`` and ``cuda.Event`` exist; copies run at once.
* Not emulated: ``__cuda_array_interface__``, ``.data``, raw kernels (``RawModule``...), ``fuse``,
  the submodules but a small ``cuda`` (``Device``, ``Stream``, ``Event``, ``alloc_pinned_memory``). Arithmetic is NumPy's, so bit-identity
  through the stand-in proves the orchestration, not the GPU's rounding; host-memory
  measurements do not carry over (the stand-in adds copies).
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import sys
import threading
import types
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from inspect import Parameter, Signature
from typing import Any

import numpy as np

import iqdb
import iqdb.kernels
from iqdb.kernels import GPU_PROFILE, SERIAL, ArrayBackend

__all__ = ["Event", "Ledger", "StandinViolation", "Tally", "ledger", "ndarray", "standin_backend", "xp"]


# -- the ledger ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Event:
    """One host-device interaction: what happened, where, and what it cost."""

    what: str  # e.g. "float()", "nonzero", "asarray", "bool mask (get)"
    site: str  # "kernels/_flat.py:247 (_search_block)"
    syncs: int = 0  # host waits on the device
    h2d: int | None = None  # bytes uploaded (None: no upload)
    d2h: int | None = None  # bytes downloaded
    quiet: bool = False  # an upload CuPy makes without being asked (host index, scalar operand)
    refused: bool = False  # an implicit host conversion, which CuPy refuses with TypeError
    dispatched: bool = False  # a NumPy function called on device arrays (__array_function__)
    pinned: int | None = None  # bytes of page-locked host memory allocated (a buffer or staging)
    from_pinned: bool = False  # an upload read from page-locked memory (asynchronous on CuPy)
    committed: int | None = None  # bytes of device memory mapped into a growable buffer


@dataclass
class Tally:
    """The events recorded while a :meth:`Ledger.record` block (or the whole session) ran."""

    events: list[Event] = field(default_factory=list)
    forbid: frozenset[str] = frozenset()
    calls: int = 0  # namespace functions, ufuncs and array methods called (about CuPy launches)

    @property
    def uploads(self) -> int:
        return sum(e.h2d is not None for e in self.events)

    @property
    def downloads(self) -> int:
        return sum(e.d2h is not None for e in self.events)

    @property
    def syncs(self) -> int:
        return sum(e.syncs for e in self.events)

    @property
    def quiet_uploads(self) -> int:
        return sum(e.quiet for e in self.events)

    @property
    def implicit(self) -> int:
        """Implicit host conversions attempted (each raised TypeError, as on CuPy)."""
        return sum(e.refused for e in self.events)

    @property
    def dispatches(self) -> int:
        return sum(e.dispatched for e in self.events)

    @property
    def upload_bytes(self) -> int:
        return sum(e.h2d or 0 for e in self.events)

    @property
    def pinned_peak(self) -> int:
        """The largest page-locked allocation (explicit, or CuPy's staging for ``asarray``)."""
        return max((e.pinned or 0 for e in self.events), default=0)

    @property
    def pageable_upload_bytes(self) -> int:
        """Bytes uploaded from memory that is not page-locked (staged by CuPy or the driver)."""
        return sum(e.h2d or 0 for e in self.events if not e.from_pinned)

    @property
    def download_bytes(self) -> int:
        return sum(e.d2h or 0 for e in self.events)

    @property
    def committed_bytes(self) -> int:
        """Device memory mapped into growable buffers (each growth of one maps its new part)."""
        return sum(e.committed or 0 for e in self.events)

    def sites(self, kind: str = "syncs") -> Counter[str]:
        """How many of ``kind`` (``syncs``, ``uploads``, ``downloads``, ``implicit``...) each
        ``site: what`` caused."""
        out: Counter[str] = Counter()
        for e in self.events:
            n = _amount(e, kind)
            if n:
                out[f"{e.site}: {e.what}"] += n
        return out

    def summary(self) -> str:
        return (
            f"syncs {self.syncs}, uploads {self.uploads} ({self.upload_bytes} B, {self.quiet_uploads} quiet), "
            f"downloads {self.downloads} ({self.download_bytes} B), implicit {self.implicit}, "
            f"dispatches {self.dispatches}, calls {self.calls}"
        )


def _amount(e: Event, kind: str) -> int:
    return {
        "syncs": e.syncs,
        "uploads": int(e.h2d is not None),
        "downloads": int(e.d2h is not None),
        "quiet": int(e.quiet),
        "implicit": int(e.refused),
        "dispatches": int(e.dispatched),
    }[kind]


class StandinViolation(AssertionError):
    """An event a :meth:`Ledger.record` block forbade happened (raised at its call site)."""


class Ledger:
    """Every event since the session started (:attr:`total`) and per :meth:`record` block."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: list[Tally] = []
        self.total = Tally()

    def reset(self) -> None:
        """Forget the session's events (open :meth:`record` blocks keep theirs)."""
        with self._lock:
            self.total = Tally()

    @contextlib.contextmanager
    def record(self, forbid: tuple[str, ...] = ()) -> Iterator[Tally]:
        """A fresh :class:`Tally` of what happens inside the block (blocks may nest).

        ``forbid`` names kinds (``syncs``, ``uploads``, ``downloads``, ``quiet``, ``implicit``,
        ``dispatches``) that raise :class:`StandinViolation` where they happen.
        """
        tally = Tally(forbid=frozenset(forbid))
        with self._lock:
            self._open.append(tally)
        try:
            yield tally
        finally:
            with self._lock:
                self._open.remove(tally)

    def note(self, what: str, **costs: Any) -> None:
        event = Event(what, _site(), **costs)
        with self._lock:
            tallies = [self.total, *self._open]
            for t in tallies:
                t.events.append(event)
        for t in tallies:
            for kind in t.forbid:
                if _amount(event, kind):
                    raise StandinViolation(f"{kind}: {event.what} at {event.site}")

    def call(self) -> None:
        self.total.calls += 1  # unlocked: a lost increment under threads is harmless here
        for t in self._open:
            t.calls += 1


ledger = Ledger()

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(iqdb.__file__)))
_OURS = tuple(os.path.dirname(os.path.abspath(p)) + os.sep for p in (iqdb.__file__, iqdb.kernels.__file__))
_HERE = os.path.abspath(__file__)


# The backend binding's transfer methods only pass a transfer on: their caller is the site.
_PASS_ON = {(os.path.join(_OURS[1], "_backend.py"), name) for name in ("asarray", "to_host")}


def _site() -> str:
    """The first frame in ``kernels/`` or ``iqdb/`` (but ``ArrayBackend.asarray``/``to_host``);
    else the first caller outside this module."""
    f: types.FrameType | None = sys._getframe(2)
    outside = None
    while f is not None:
        name = f.f_code.co_filename
        if name.startswith(_OURS) and (name, f.f_code.co_name) not in _PASS_ON:
            return f"{os.path.relpath(name, _REPO)}:{f.f_lineno} ({f.f_code.co_name})"
        if outside is None and name != _HERE and (name, f.f_code.co_name) not in _PASS_ON:
            outside = f"{os.path.basename(name)}:{f.f_lineno} ({f.f_code.co_name})"
        f = f.f_back
    return outside or "?"


# -- CuPy 14.2's names and signatures --------------------------------------------------------------
# From the cupy-cuda12x 14.2.0 wheel (`import cupy` needs no driver): `dir(cupy)` and
# `inspect.signature` (or the embedded signature line of a Cython docstring), kept where NumPy 2
# has the same name. "name=" marks a parameter with a default; "*" starts the keyword-only ones.
_FUNCTIONS = """
all(a,axis=,out=,keepdims=) allclose(a,b,rtol=,atol=,equal_nan=) amax(a,axis=,out=,keepdims=)
amin(a,axis=,out=,keepdims=) angle(z,deg=) any(a,axis=,out=,keepdims=) append(arr,values,axis=)
apply_along_axis(func1d,axis,arr,*args,**kwargs) apply_over_axes(func,a,axes)
arange(start,stop=,step=,dtype=) argmax(a,axis=,dtype=,out=,keepdims=)
argmin(a,axis=,dtype=,out=,keepdims=) argwhere(a) around(a,decimals=,out=) array_equal(a1,a2,equal_nan=)
array_equiv(a1,a2) array_split(ary,indices_or_sections,axis=) asfortranarray(a,dtype=)
astype(x,dtype,*,copy=) atleast_1d(*arys) atleast_2d(*arys) atleast_3d(*arys)
average(a,axis=,weights=,returned=,*,keepdims=) bartlett(M) blackman(M) broadcast_arrays(*args)
broadcast_shapes(*args) broadcast_to(array,shape) can_cast(from_,to,casting=)
choose(a,choices,out=,mode=) clip(a,a_min,a_max,out=) column_stack(tup) common_type(*arrays)
compress(condition,a,axis=,out=) concat(tup,axis=,out=,*,dtype=,casting=)
concatenate(tup,axis=,out=,*,dtype=,casting=) convolve(a,v,mode=) copy(a,order=)
copyto(dst,src,casting=,where=) corrcoef(a,y=,rowvar=,bias=,ddof=,*,dtype=) correlate(a,v,mode=)
count_nonzero(a,axis=) cov(a,y=,rowvar=,bias=,ddof=,fweights=,aweights=,*,dtype=)
cross(a,b,axisa=,axisb=,axisc=,axis=) cumprod(a,axis=,dtype=,out=) cumsum(a,axis=,dtype=,out=)
cumulative_prod(x,*,axis=,dtype=,out=,include_initial=)
cumulative_sum(x,*,axis=,dtype=,out=,include_initial=) delete(arr,indices,axis=) diag(v,k=)
diag_indices(n,ndim=) diag_indices_from(arr) diagflat(v,k=) diagonal(a,offset=,axis1=,axis2=)
diff(a,n=,axis=,prepend=,append=) digitize(x,bins,right=) dot(a,b,out=) dsplit(ary,indices_or_sections)
dstack(tup) ediff1d(arr,to_end=,to_begin=) empty(shape,dtype=,order=)
empty_like(prototype,dtype=,order=,subok=,shape=) expand_dims(a,axis) extract(condition,a)
eye(N,M=,k=,dtype=,order=) fill_diagonal(a,val,wrap=) flatnonzero(a) flip(a,axis=) fliplr(a) flipud(a)
full(shape,fill_value,dtype=,order=) full_like(a,fill_value,dtype=,order=,subok=,shape=)
gradient(f,*varargs,axis=,edge_order=) hamming(M) hanning(M) histogram(x,bins=,range=,density=,weights=)
histogram2d(x,y,bins=,range=,weights=,density=) histogramdd(sample,bins=,range=,weights=,density=)
hsplit(ary,indices_or_sections) hstack(tup,*,dtype=,casting=) identity(n,dtype=) imag(val)
indices(dimensions,dtype=) inner(a,b) interp(x,xp,fp,left=,right=,period=)
intersect1d(arr1,arr2,assume_unique=,return_indices=) isclose(a,b,rtol=,atol=,equal_nan=) iscomplex(x)
iscomplexobj(x) isdtype(dtype,kind) isfortran(a) isin(element,test_elements,assume_unique=,invert=)
isneginf(x,out=) isposinf(x,out=) isreal(x) isrealobj(x) isscalar(element) issubdtype(arg1,arg2)
iterable(y) ix_(*args) kaiser(M,beta) kron(a,b) linspace(start,stop,num=,endpoint=,retstep=,dtype=,axis=)
logspace(start,stop,num=,endpoint=,base=,dtype=,axis=) mask_indices(n,mask_func,k=)
matmul(*args,axes=,axis=,keepdims=,casting=,dtype=,signature=,order=,out=)
matrix_transpose(x) max(a,axis=,out=,keepdims=) may_share_memory(a,b,max_work=)
mean(a,axis=,dtype=,out=,keepdims=) median(a,axis=,out=,overwrite_input=,keepdims=)
meshgrid(*xi,**kwargs) min(a,axis=,out=,keepdims=) mintypecode(typechars,typeset=,default=)
moveaxis(a,source,destination) nan_to_num(x,copy=,nan=,posinf=,neginf=)
nanargmax(a,axis=,dtype=,out=,keepdims=) nanargmin(a,axis=,dtype=,out=,keepdims=)
nancumprod(a,axis=,dtype=,out=) nancumsum(a,axis=,dtype=,out=) nanmax(a,axis=,out=,keepdims=)
nanmean(a,axis=,dtype=,out=,keepdims=) nanmedian(a,axis=,out=,overwrite_input=,keepdims=)
nanmin(a,axis=,out=,keepdims=) nanprod(a,axis=,dtype=,out=,keepdims=)
nanstd(a,axis=,dtype=,out=,ddof=,keepdims=) nansum(a,axis=,dtype=,out=,keepdims=)
nanvar(a,axis=,dtype=,out=,ddof=,keepdims=) ndim(a) nonzero(a) ones(shape,dtype=,order=)
ones_like(a,dtype=,order=,subok=,shape=) outer(a,b,out=) packbits(a,axis=,bitorder=)
pad(array,pad_width,mode=,**kwargs) percentile(a,q,axis=,out=,overwrite_input=,method=,keepdims=,*,interpolation=)
permute_dims(a,axes=) piecewise(x,condlist,funclist) place(arr,mask,vals) poly(seq_of_zeros)
polyadd(a1,a2) polyfit(x,y,deg,rcond=,full=,w=,cov=) polymul(a1,a2) polysub(a1,a2) polyval(p,x)
prod(a,axis=,dtype=,out=,keepdims=) promote_types(type1,type2) ptp(a,axis=,out=,keepdims=)
put(a,ind,v,mode=) put_along_axis(arr,indices,values,axis) putmask(a,mask,values)
quantile(a,q,axis=,out=,overwrite_input=,method=,keepdims=,*,interpolation=) ravel(a,order=)
ravel_multi_index(multi_index,dims,mode=,order=) real(val) real_if_close(a,tol=) repeat(a,repeats,axis=)
require(a,dtype=,requirements=) reshape(a,newshape,order=,*,copy=) resize(a,new_shape)
result_type(*arrays_and_dtypes) roll(a,shift,axis=) rollaxis(a,axis,start=) roots(p) rot90(a,k=,axes=)
round(a,decimals=,out=) row_stack(tup,*,dtype=,casting=) select(condlist,choicelist,default=)
setdiff1d(ar1,ar2,assume_unique=) setxor1d(ar1,ar2,assume_unique=) shape(a) shares_memory(a,b,max_work=)
size(a,axis=) sort_complex(a) split(ary,indices_or_sections,axis=) squeeze(a,axis=)
stack(tup,axis=,out=,*,dtype=,casting=) std(a,axis=,dtype=,out=,ddof=,keepdims=)
sum(a,axis=,dtype=,out=,keepdims=) swapaxes(a,axis1,axis2) take(a,indices,axis=,out=)
take_along_axis(a,indices,axis) tensordot(a,b,axes=) tile(A,reps) trace(a,offset=,axis1=,axis2=,dtype=,out=)
transpose(a,axes=) trapezoid(y,x=,dx=,axis=) tri(N,M=,k=,dtype=) tril(m,k=) tril_indices(n,k=,m=)
tril_indices_from(arr,k=) trim_zeros(filt,trim=) triu(m,k=) triu_indices(n,k=,m=)
triu_indices_from(arr,k=) typename(char) union1d(arr1,arr2)
unique(ar,return_index=,return_inverse=,return_counts=,axis=,*,equal_nan=) unique_all(x)
unique_counts(x) unique_inverse(x) unique_values(x) unpackbits(a,axis=,bitorder=)
unravel_index(indices,dims,order=) unwrap(p,discont=,axis=,*,period=) vander(x,N=,increasing=)
var(a,axis=,dtype=,out=,ddof=,keepdims=) vdot(a,b) vsplit(ary,indices_or_sections)
vstack(tup,*,dtype=,casting=) zeros(shape,dtype=,order=) zeros_like(a,dtype=,order=,subok=,shape=)
"""
_METHODS = """
all(axis=,out=,keepdims=) any(axis=,out=,keepdims=) argmax(axis=,out=,dtype=,keepdims=)
argmin(axis=,out=,dtype=,keepdims=) choose(choices,out=,mode=) clip(min=,max=,out=) conj() conjugate()
cumprod(axis=,dtype=,out=) cumsum(axis=,dtype=,out=) diagonal(offset=,axis1=,axis2=) dot(b,out=)
flatten(order=) max(axis=,out=,keepdims=) mean(axis=,dtype=,out=,keepdims=) min(axis=,out=,keepdims=)
prod(axis=,dtype=,out=,keepdims=) put(indices,values,mode=) ravel(order=) reshape(*shape,order=,copy=)
round(decimals=,out=) searchsorted(v,side=,sorter=) squeeze(axis=) std(axis=,dtype=,out=,ddof=,keepdims=)
sum(axis=,dtype=,out=,keepdims=) swapaxes(axis1,axis2) take(indices,axis=,out=)
trace(offset=,axis1=,axis2=,dtype=,out=) transpose(*axes) var(axis=,dtype=,out=,ddof=,keepdims=)
"""
_UFUNCS = """
abs absolute acos acosh add arccos arccosh arcsin arcsinh arctan arctan2 arctanh asin asinh atan atan2 atanh
bitwise_and bitwise_count bitwise_invert bitwise_left_shift bitwise_not bitwise_or bitwise_right_shift
bitwise_xor cbrt ceil conj conjugate copysign cos cosh deg2rad degrees divide divmod equal exp exp2 expm1
fabs float_power floor floor_divide fmax fmin fmod frexp gcd greater greater_equal heaviside hypot invert
isfinite isinf isnan lcm ldexp left_shift less less_equal log log10 log1p log2 logaddexp logaddexp2
logical_and logical_not logical_or logical_xor maximum minimum mod modf multiply negative nextafter
not_equal positive pow power rad2deg radians reciprocal remainder right_shift rint sign signbit sin sinh
sqrt square subtract tan tanh true_divide trunc
"""
# CuPy's dtypes and type helpers are NumPy's own objects.
_NUMPY_TYPES = """
bool bool_ byte cdouble complex128 complex64 complexfloating csingle double dtype finfo float16 float32
float64 floating generic half iinfo inexact int16 int32 int64 int8 int_ intc integer intp long longlong
number short signedinteger single ubyte uint uint16 uint32 uint64 uint8 uintc uintp ulong ulonglong
unsignedinteger ushort
"""
_EXCEPTIONS = (
    "AxisError ComplexWarning ModuleDeprecationWarning RankWarning TooHardError VisibleDeprecationWarning"
)
_CONSTANTS = {
    **dict.fromkeys(["Inf", "Infinity", "PINF", "inf", "infty"], math.inf),
    **dict.fromkeys(["NAN", "NaN", "nan"], math.nan),
    "NINF": -math.inf,
    "NZERO": -0.0,
    "PZERO": 0.0,
    "e": math.e,
    "pi": math.pi,
    "euler_gamma": float(np.euler_gamma),
    "newaxis": None,
}
# Functions whose result shape depends on the data: a sync each (bincount: see bincount()).
_SHAPE_SYNCS = """
argwhere compress extract flatnonzero histogram histogram2d histogramdd intersect1d nonzero roots setdiff1d
setxor1d trim_zeros union1d unique unique_all unique_counts unique_inverse unique_values
"""
# NumPy answers a Python scalar where CuPy answers a 0-d device array.
_ARRAY_RESULT = frozenset({"allclose", "array_equal", "array_equiv", "count_nonzero"})


def _signatures(table: str) -> dict[str, Signature]:
    out = {}
    for entry in table.split():
        name, _, rest = entry.partition("(")
        params, kind = [], Parameter.POSITIONAL_OR_KEYWORD
        for tok in filter(None, rest.rstrip(")").split(",")):
            if tok == "*":
                kind = Parameter.KEYWORD_ONLY
            elif tok.startswith("**"):
                params.append(Parameter(tok[2:], Parameter.VAR_KEYWORD))
            elif tok.startswith("*"):
                params.append(Parameter(tok[1:], Parameter.VAR_POSITIONAL))
                kind = Parameter.KEYWORD_ONLY
            else:
                default = None if tok.endswith("=") else Parameter.empty
                params.append(Parameter(tok.rstrip("="), kind, default=default))
        out[name] = Signature(params)
    return out


_FUNCTION_SIGS = _signatures(_FUNCTIONS)
_METHOD_SIGS = _signatures(_METHODS)


# -- conversions at the boundary ---------------------------------------------------------------------


def _wrap(a: np.ndarray) -> ndarray:
    obj = object.__new__(ndarray)
    obj._a = a
    return obj


def _result(r: Any, name: str = "") -> Any:
    """A NumPy result as the device would give it: arrays and NumPy scalars become device arrays."""
    if isinstance(r, np.ndarray):
        return _wrap(r)
    if isinstance(r, np.generic) or (name in _ARRAY_RESULT and isinstance(r, (bool, int, float))):
        return _wrap(np.asarray(r))
    if isinstance(r, tuple):
        return type(r)(*map(_result, r)) if hasattr(r, "_fields") else tuple(map(_result, r))
    if isinstance(r, list):
        return [_result(x) for x in r]
    return r


def _refuse(x: object, where: str) -> TypeError:
    ledger.note(f"{where}: host {type(x).__name__} operand", refused=True)
    return TypeError(f"Unsupported type {type(x)}")


def _operand(x: Any, where: str) -> Any:
    """A ufunc operand: a device array or a scalar (CuPy refuses host arrays and sequences)."""
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, (bool, int, float, complex, np.generic)):
        return x
    raise _refuse(x, where)


def _unwrap(x: Any, where: str) -> Any:
    """A function argument: device arrays unwrapped (also inside lists and tuples); a host array
    refused; anything else (shapes, dtypes, scalars, callables) as it is."""
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, np.ndarray):
        raise _refuse(x, where)
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(v, where) for v in x)
    return x


def _run(func: Callable[..., Any], name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Call a NumPy function on unwrapped arguments, as CuPy would: no floating-point errors, the
    result on the device, ``out=`` filled and returned as the caller's own device array."""
    ledger.call()
    args = _unwrap(args, name)
    out = kwargs.get("out")
    kwargs = {k: _unwrap(v, name) for k, v in kwargs.items()}
    with np.errstate(all="ignore"):
        r = func(*args, **kwargs)
    if isinstance(out, ndarray) and r is out._a:
        return out
    return _result(r, name)


def _host_index(key: Any, what: str) -> Any:
    """An index for NumPy: device arrays unwrapped (a boolean mask is a sync: the result's shape
    depends on it), host arrays and lists uploaded quietly, as CuPy does."""
    if isinstance(key, tuple):
        return tuple(_host_index(k, what) for k in key)
    if isinstance(key, ndarray):
        if key.dtype == np.bool_:
            ledger.note(f"bool mask ({what})", syncs=1)
        return key._a
    if isinstance(key, (np.ndarray, list)):
        host = np.asarray(key)
        ledger.note(f"host index ({what})", h2d=host.nbytes, quiet=True, syncs=int(host.dtype == np.bool_))
        return host
    return key


# -- device arrays -----------------------------------------------------------------------------------


class ndarray:
    """A device array: one NumPy array, reachable only through the namespace's operations."""

    __slots__ = ("_a",)
    __hash__ = None  # type: ignore[assignment]  # as cupy.ndarray: mutable, unhashable
    _a: np.ndarray

    def __init__(self, shape: Any, dtype: Any = float, order: str = "C") -> None:
        self._a = np.empty(shape, dtype=dtype, order=order)  # uninitialised memory, as CuPy

    # Metadata lives on the host in CuPy too: no sync.
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    itemsize = property(lambda self: self._a.itemsize)
    nbytes = property(lambda self: self._a.nbytes)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: _wrap(self._a.T))
    mT = property(lambda self: _wrap(self._a.mT))
    real = property(lambda self: _wrap(self._a.real))
    imag = property(lambda self: _wrap(self._a.imag))
    base = property(lambda self: _wrap(self._a.base) if isinstance(self._a.base, np.ndarray) else None)
    device = property(lambda self: _Device(0))

    def __len__(self) -> int:
        return len(self._a)

    def __iter__(self) -> Iterator[ndarray]:
        if self._a.ndim == 0:
            raise TypeError("iteration over a 0-d array")
        return (_wrap(self._a[i, ...]) for i in range(self._a.shape[0]))

    def __getattr__(self, name: str) -> Any:
        sig = _METHOD_SIGS.get(name)
        if sig is None:
            raise AttributeError(f"'cupy.ndarray' (stand-in) has no attribute {name!r}")
        method = getattr(self._a, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            sig.bind(*args, **kwargs)
            return _run(method, name, args, kwargs)

        return call

    # -- indexing (an integer index gives a 0-d view, as in CuPy) -------------------------------
    def __getitem__(self, key: Any) -> ndarray:
        ledger.call()
        k = _host_index(key, "get")
        r = self._a[k]
        if not isinstance(r, np.ndarray):
            r = self._a[(*k, ...) if isinstance(k, tuple) else (k, ...)]
        return _wrap(r)

    def __setitem__(self, key: Any, value: Any) -> None:
        ledger.call()
        k = _host_index(key, "set")
        if isinstance(value, ndarray):
            value = value._a
        elif isinstance(value, (np.ndarray, list, tuple)):
            value = np.asarray(value)
            ledger.note("host value (set)", h2d=value.nbytes, quiet=True)
        self._a[k] = value

    # -- what leaves the device --------------------------------------------------------------------
    def _download(self, what: str) -> None:
        ledger.note(what, syncs=1, d2h=self._a.nbytes)

    def get(
        self, stream: Any = None, order: str = "C", out: np.ndarray | None = None, blocking: bool = True
    ) -> Any:
        self._download("get()")
        if out is not None:
            out[...] = self._a
            return out
        return np.array(self._a, order=order, copy=True)

    def tolist(self) -> Any:
        self._download("tolist()")
        return self._a.tolist()

    def item(self) -> Any:
        self._download("item()")
        return self._a.item()

    def tobytes(self, order: str = "C") -> bytes:
        self._download("tobytes()")
        return self._a.tobytes(order=order)

    def set(self, arr: np.ndarray, stream: Any = None) -> None:
        # CuPy's checks, in its order (cupy/_core/core.pyx, ndarray.set).
        if not isinstance(arr, np.ndarray):
            raise TypeError(f"Only numpy.ndarray can be set to cupy.ndarray, got {type(arr)}")
        if self._a.size != arr.size:
            raise ValueError(f"Shape mismatch. Old shape: {self._a.shape}, new shape: {arr.shape}")
        if self._a.dtype != arr.dtype:
            raise TypeError(f"{arr.dtype} array cannot be set to {self._a.dtype} array")
        if not self._a.flags.c_contiguous:
            raise RuntimeError("Cannot set to non-contiguous array")
        pinned = _is_pinned(arr)
        ledger.note("set() pinned" if pinned else "set()", h2d=arr.nbytes, from_pinned=pinned)
        self._a[...] = arr.reshape(self._a.shape)

    def __float__(self) -> float:
        self._download("float()")
        return float(self._a)

    def __int__(self) -> int:
        self._download("int()")
        return int(self._a)

    def __bool__(self) -> bool:
        self._download("bool()")
        return bool(self._a)

    def __complex__(self) -> complex:
        self._download("complex()")
        return complex(self._a)

    def __repr__(self) -> str:
        self._download("repr()")
        return repr(self._a).replace("array(", "standin.array(", 1)

    def __str__(self) -> str:
        self._download("str()")
        return str(self._a)

    def __format__(self, spec: str) -> str:
        self._download("format()")
        return format(self._a, spec)

    # -- what CuPy refuses ---------------------------------------------------------------------------
    def __array__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        ledger.note("__array__", refused=True)
        raise TypeError(
            "Implicit conversion to a NumPy array is not allowed. "
            "Please use `.get()` to construct a NumPy array explicitly."
        )

    def __dlpack__(self, *args: Any, **kwargs: Any) -> Any:
        ledger.note("__dlpack__", refused=True)
        raise TypeError("the stand-in's memory is not on a device DLPack consumers can read")

    def __array_ufunc__(self, uf: np.ufunc, method: str, *inputs: Any, **kwargs: Any) -> Any:
        mine = xp.__dict__.get(uf.__name__)
        if method != "__call__" or not isinstance(mine, ufunc):
            return NotImplemented
        out = kwargs.get("out")
        if isinstance(out, tuple) and len(out) == 1:
            kwargs["out"] = out[0]
        return mine(*inputs, **kwargs)

    def __array_function__(self, func: Any, types_: Any, args: Any, kwargs: Any) -> Any:
        name = func.__name__
        mine = xp.__dict__.get(name)
        if mine is None or getattr(np, name, None) is not func:
            return NotImplemented
        ledger.note(f"np.{name} on device arrays", dispatched=True)
        return mine(*args, **kwargs)

    # -- CuPy's sorting semantics ------------------------------------------------------------------
    def sort(self, axis: int = -1, kind: str | None = None) -> None:
        ledger.call()
        _check_kind(kind)
        self._a.sort(axis=axis, kind="stable")

    def argsort(self, axis: int = -1, kind: str | None = None) -> ndarray:
        return argsort(self, axis, kind)

    def partition(self, kth: Any, axis: int = -1) -> None:
        ledger.call()
        self._a[...] = _partitioned(self._a, kth, axis)

    def argpartition(self, kth: Any, axis: int = -1) -> ndarray:
        return argpartition(self, kth, axis)

    # -- methods whose result shape depends on the data ---------------------------------------------
    def nonzero(self) -> tuple[ndarray, ...]:
        return nonzero(self)

    def compress(self, condition: Any, axis: int | None = None, out: Any = None) -> ndarray:
        return compress(condition, self, axis, out)

    def repeat(self, repeats: Any, axis: int | None = None) -> ndarray:
        return repeat(self, repeats, axis)

    # -- methods with CuPy's own parameters --------------------------------------------------------
    def astype(
        self, dtype: Any, order: str = "K", casting: str | None = None, subok: Any = None, copy: bool = True
    ) -> ndarray:
        ledger.call()
        r = self._a.astype(dtype, order=order, casting=casting or "unsafe", copy=copy)
        return self if r is self._a else _wrap(r)

    def view(self, dtype: Any = None, type: Any = None) -> ndarray:
        ledger.call()
        return _wrap(self._a.view() if dtype is None else self._a.view(dtype))

    def copy(self, order: str = "C") -> ndarray:
        ledger.call()
        return _wrap(self._a.copy(order=order))

    def fill(self, value: Any) -> None:
        ledger.call()
        self._a.fill(_operand(value, "fill"))

    def __copy__(self) -> ndarray:
        return self.copy()

    def __deepcopy__(self, memo: Any) -> ndarray:
        return self.copy()


def _binary(name: str, reflected: bool = False, inplace: bool = False) -> Callable[..., Any]:
    def op(self: ndarray, other: Any) -> Any:
        uf = getattr(xp, name)
        if inplace:
            return uf(self, other, out=self)
        return uf(other, self) if reflected else uf(self, other)

    return op


for _dunder, _name in {
    "add": "add",
    "sub": "subtract",
    "mul": "multiply",
    "truediv": "true_divide",
    "floordiv": "floor_divide",
    "mod": "remainder",
    "pow": "power",
    "and": "bitwise_and",
    "or": "bitwise_or",
    "xor": "bitwise_xor",
    "lshift": "left_shift",
    "rshift": "right_shift",
    "matmul": "matmul",
}.items():
    setattr(ndarray, f"__{_dunder}__", _binary(_name))
    setattr(ndarray, f"__r{_dunder}__", _binary(_name, reflected=True))
    setattr(ndarray, f"__i{_dunder}__", _binary(_name, inplace=True))
for _dunder, _name in {"eq": "equal", "ne": "not_equal", "lt": "less", "le": "less_equal"}.items():
    setattr(ndarray, f"__{_dunder}__", _binary(_name))
ndarray.__gt__ = _binary("greater")  # type: ignore[method-assign]
ndarray.__ge__ = _binary("greater_equal")  # type: ignore[method-assign]
ndarray.__divmod__ = _binary("divmod")  # type: ignore[attr-defined]
ndarray.__rdivmod__ = _binary("divmod", reflected=True)  # type: ignore[attr-defined]
for _dunder, _name in {"neg": "negative", "pos": "positive", "abs": "absolute", "invert": "invert"}.items():
    setattr(ndarray, f"__{_dunder}__", lambda self, _n=_name: getattr(xp, _n)(self))


class ufunc:
    """A CuPy ufunc: device arrays and scalars in; only ``out``, ``dtype`` and ``casting``."""

    def __init__(self, name: str) -> None:
        self.__name__ = name
        self._np: np.ufunc = getattr(np, name)
        self.nin, self.nout = self._np.nin, self._np.nout

    def __repr__(self) -> str:
        return f"<ufunc '{self.__name__}'>"

    def __call__(self, *args: Any, out: Any = None, dtype: Any = None, casting: str = "same_kind") -> Any:
        ledger.call()
        if len(args) > self.nin:  # outputs given positionally
            if out is not None:
                raise TypeError("cannot specify 'out' as both a positional and keyword argument")
            args, out = args[: self.nin], args[self.nin :]
        ins = [_operand(a, self.__name__) for a in args]
        kwargs: dict[str, Any] = {"casting": casting}
        if dtype is not None:
            kwargs["dtype"] = dtype
        outs = out if isinstance(out, tuple) else (out,) if out is not None else ()
        for o in outs:
            if not isinstance(o, ndarray):
                raise _refuse(o, f"{self.__name__}(out=)")
        if outs:
            kwargs["out"] = tuple(o._a for o in outs)
        with np.errstate(all="ignore"):
            r = self._np(*ins, **kwargs)
        if outs:
            return outs[0] if self.nout == 1 else outs
        return _result(r)


# -- the namespace's own functions (transfers, data-dependent shapes, CuPy semantics) ---------------


def _check_kind(kind: str | None) -> None:
    if kind is not None and kind != "stable":
        raise ValueError("kind can only be None or 'stable'")


def _partitioned(a: np.ndarray, kth: Any, axis: int | None) -> np.ndarray:
    """``partition`` as CuPy's bitonic kernel may order NaN: here every NaN ranks *first*, so a
    caller that needs NaN last (NumPy's order) gets a wrong k-th element."""
    if axis is None:
        a, axis = a.reshape(-1), -1
    if a.dtype.kind in "fc" and np.isnan(a).any():
        key = np.where(np.isnan(a), -np.inf, a)
        return np.take_along_axis(a, np.argsort(key, axis=axis, kind="stable"), axis=axis)
    return np.partition(a, kth, axis=axis)


def _device(a: Any, name: str) -> ndarray:
    """``a``, checked to be a device array (CuPy's sorting functions take nothing else)."""
    if not isinstance(a, ndarray):
        raise (
            _refuse(a, name)
            if isinstance(a, np.ndarray)
            else TypeError(f"{name}: a cupy.ndarray is required")
        )
    return a


def asarray(
    a: Any, dtype: Any = None, order: str | None = None, *, copy: bool | None = None, blocking: bool = False
) -> ndarray:
    """A device array: ``a`` itself when it already is one (of that dtype), else an upload."""
    ledger.call()
    if isinstance(a, ndarray):
        r = a._a if dtype is None else a._a.astype(dtype, copy=False)
        if copy:
            r = r.copy(order=order or "K")
        return a if r is a._a else _wrap(r)
    if copy is False:
        raise ValueError("a host array cannot be used on the device without a copy")
    host = np.array(a, dtype=dtype, order=order or "K", copy=True)  # device memory is its own
    # CuPy stages pageable memory through a page-locked block of the whole size (kept in its
    # pinned pool afterwards): research note gpu.md section 3.5.
    pinned = isinstance(a, np.ndarray) and _is_pinned(a)
    ledger.note("asarray", h2d=host.nbytes, pinned=None if pinned else host.nbytes, from_pinned=pinned)
    return _wrap(host)


def array(
    obj: Any,
    dtype: Any = None,
    copy: bool = True,
    order: str = "K",
    subok: bool = False,
    ndmin: int = 0,
    *,
    blocking: bool = False,
) -> ndarray:
    ledger.call()
    if isinstance(obj, ndarray):
        return _wrap(np.array(obj._a, dtype=dtype, copy=copy, order=order, ndmin=ndmin))
    host = np.array(obj, dtype=dtype, copy=True, order=order, ndmin=ndmin)
    ledger.note("array", h2d=host.nbytes)
    return _wrap(host)


def ascontiguousarray(a: Any, dtype: Any = None) -> ndarray:
    if isinstance(a, ndarray):
        ledger.call()
        r = np.ascontiguousarray(a._a, dtype=dtype)
        return a if r is a._a else _wrap(r)
    return asarray(a, dtype=dtype, order="C")


def asnumpy(
    a: Any, stream: Any = None, order: str = "C", out: np.ndarray | None = None, *, blocking: bool = True
) -> np.ndarray:
    if isinstance(a, ndarray):
        return a.get(order=order, out=out)
    host = np.asarray(a, order=order)
    if out is not None:
        out[...] = host
        return out
    return host


def get_array_module(*args: Any) -> Any:
    return xp if any(isinstance(a, ndarray) for a in args) else np


def einsum(*operands: Any, **kwargs: Any) -> ndarray:
    """CuPy's einsum: ``dtype`` and ``optimize`` only (no ``out=``, ``order``, ``casting``)."""
    dtype, optimize = kwargs.pop("dtype", None), kwargs.pop("optimize", False)
    if kwargs:
        raise TypeError(f"Did not understand the following kwargs: {list(kwargs.keys())}")
    return _run(np.einsum, "einsum", operands, {"dtype": dtype, "optimize": optimize})


def sort(a: Any, axis: int | None = -1, kind: str | None = None) -> ndarray:
    _check_kind(kind)
    return _run(np.sort, "sort", (_device(a, "sort"), axis), {"kind": "stable"})


def argsort(a: Any, axis: int | None = -1, kind: str | None = None) -> ndarray:
    _check_kind(kind)
    return _run(np.argsort, "argsort", (_device(a, "argsort"), axis), {"kind": "stable"})


def argpartition(a: Any, kth: Any, axis: int | None = -1) -> ndarray:
    """A full stable argsort, as CuPy's (``kth`` is ignored): ties come out in index order."""
    return _run(np.argsort, "argpartition", (_device(a, "argpartition"), axis), {"kind": "stable"})


def partition(a: Any, kth: Any, axis: int | None = -1) -> ndarray:
    return _run(_partitioned, "partition", (_device(a, "partition"), kth, axis), {})


def lexsort(keys: Any) -> ndarray:
    """CuPy's lexsort: one ``(k, N)`` device array of keys (no tuple of arrays), at most 2-D."""
    if not isinstance(keys, ndarray):
        raise TypeError("lexsort: keys must be one cupy.ndarray, not a sequence")
    if keys.ndim > 2:
        raise NotImplementedError("Keys with the rank of three or more is not supported in lexsort")
    return _run(np.lexsort, "lexsort", (keys,), {})


def where(condition: Any, x: Any = None, y: Any = None) -> Any:
    missing = (x is None, y is None).count(True)
    if missing == 1:
        raise ValueError("Must provide both 'x' and 'y' or neither.")
    if missing == 2:
        return nonzero(condition)
    ledger.call()
    args = [_operand(v, "where") for v in (condition, x, y)]
    with np.errstate(all="ignore"):
        return _result(np.where(*args))


def bincount(x: Any, weights: Any = None, minlength: int | None = None) -> ndarray:
    # CuPy checks (x < 0).any() and, unless x is empty, reads int(max(x)): two syncs.
    ledger.note("bincount", syncs=1 if _device(x, "bincount").size == 0 else 2)
    return _run(np.bincount, "bincount", (x,), {"weights": weights, "minlength": minlength or 0})


def repeat(a: Any, repeats: Any, axis: int | None = None) -> ndarray:
    if isinstance(repeats, ndarray) and repeats.size > 1:
        ledger.note("repeat (by an array)", syncs=1)
    return _run(np.repeat, "repeat", (a, repeats, axis), {})


def delete(arr: Any, indices: Any, axis: int | None = None) -> ndarray:
    """CuPy's delete: a mask, then ``compress`` (a sync) whatever ``indices`` is."""
    if not isinstance(arr, ndarray):
        raise ValueError("delete(): arr must be a cupy.ndarray")
    if isinstance(indices, (np.ndarray, list)):
        host = np.asarray(indices)
        ledger.note("delete (host indices)", h2d=host.nbytes, quiet=True)
        indices = _wrap(host)
    ledger.note("delete", syncs=1)
    return _run(np.delete, "delete", (arr, indices, axis), {})


def searchsorted(a: Any, v: Any, side: str = "left", sorter: Any = None) -> ndarray:
    if not isinstance(a, ndarray):
        raise NotImplementedError("Only int or ndarray are supported for a")
    if not isinstance(v, ndarray):
        if not isinstance(v, int | float | complex):
            raise NotImplementedError("Only python scalars or ndarrays are supported for v")
        ledger.note("searchsorted (scalar v)", h2d=8, quiet=True)  # CuPy: cupy.asarray(v)
    return _run(np.searchsorted, "searchsorted", (a, v, side, sorter), {})


def _counted(name: str, syncs: int) -> Callable[..., Any]:
    """A NumPy function checked against CuPy's signature; ``syncs`` when its shape is data's."""
    func, sig = getattr(np, name), _FUNCTION_SIGS[name]

    def call(*args: Any, **kwargs: Any) -> Any:
        sig.bind(*args, **kwargs)
        if syncs:
            ledger.note(name, syncs=syncs)
        return _run(func, name, args, kwargs)

    call.__name__ = call.__qualname__ = name
    return call


nonzero = _counted("nonzero", 1)
flatnonzero = _counted("flatnonzero", 1)
compress = _counted("compress", 1)


class _Device:
    """``cupy.cuda.Device``: the stand-in has one device, 0."""

    def __init__(self, device: int | None = None) -> None:
        self.id = 0 if device is None else int(device)
        if self.id != 0:
            raise RuntimeError(f"cudaErrorInvalidDevice: the stand-in has no device {self.id}")

    def __enter__(self) -> _Device:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def use(self) -> None:
        return None

    def synchronize(self) -> None:
        ledger.note("Device.synchronize()", syncs=1)


# -- page-locked memory, streams and events ---------------------------------------------------------

_PINNED: list[weakref.ref[np.ndarray]] = []  # live page-locked blocks (bytes on the host, as in CuPy)
_PINNED_LOCK = threading.Lock()


def _is_pinned(arr: np.ndarray) -> bool:
    with _PINNED_LOCK:
        blocks = [b for b in (r() for r in _PINNED) if b is not None]
    return any(np.may_share_memory(arr, b) for b in blocks)


def alloc_pinned_memory(size: int) -> np.ndarray:
    """``cupy.cuda.alloc_pinned_memory``: a page-locked block (here a byte array; CuPy's pointer
    exposes the buffer protocol the same way, for ``numpy.frombuffer``)."""
    block = np.empty(int(size), dtype=np.uint8)
    with _PINNED_LOCK:
        _PINNED[:] = [r for r in _PINNED if r() is not None]
        _PINNED.append(weakref.ref(block))
    ledger.note("alloc_pinned_memory", pinned=int(size))
    return block


class _Event:
    """``cupy.cuda.Event``: the stand-in runs every copy at once, so an event is always done."""

    done = True

    def synchronize(self) -> None:
        return None  # a host wait on a copy stream: not a search's sync


class _Stream:
    """``cupy.cuda.Stream``: work "on" it runs at once (copies are synchronous here)."""

    def __init__(self, null: bool = False, non_blocking: bool = False, ptds: bool = False) -> None:
        self.non_blocking = non_blocking

    def __enter__(self) -> _Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def record(self, event: _Event | None = None) -> _Event:
        return _Event() if event is None else event

    def synchronize(self) -> None:
        return None


# -- device memory that grows in place (CUDA virtual memory: iqdb.kernels._vmm) ---------------------

STANDIN_DEVICE_MEMORY = 256 << 20  # the stand-in device's "total memory": what a growable reserves
GRANULARITY = 64 << 10  # commits are rounded up to this (CUDA's is 2 MiB)


class DeviceMemory:
    """Bytes committed to growable device buffers now (``live``) and at most (``peak``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.live = self.peak = 0

    def add(self, nbytes: int) -> None:
        with self._lock:
            self.live += nbytes
            self.peak = max(self.peak, self.live)

    def reset_peak(self) -> None:
        with self._lock:
            self.peak = self.live


device_memory = DeviceMemory()


class Growable:
    """``kernels._vmm.CudaGrowable`` on the CPU: a reserved range of host address space (pages
    never touched cost no memory) whose committed start is the device buffer. Arrays over it are
    views, valid while it grows, as over a CUDA reservation; its memory counts in
    :data:`device_memory` until the last array over it goes."""

    def __init__(self, reserve: int) -> None:
        self.reserved = -(-max(1, reserve) // GRANULARITY) * GRANULARITY
        self.committed = 0
        # An anonymous map: address space only until touched, and invisible to tracemalloc (the
        # host-memory tests trace the host, and this stands for device memory).
        self._raw = np.frombuffer(mmap.mmap(-1, self.reserved), dtype=np.uint8)
        self._held = [0]  # committed bytes, for the finaliser
        weakref.finalize(self._raw, _release, self._held)  # the size committed by then

    def ensure(self, nbytes: int) -> None:
        if nbytes <= self.committed:
            return
        if nbytes > self.reserved:
            raise MemoryError(f"{nbytes:,} bytes asked of a device buffer that reserved {self.reserved:,}")
        size = -(-(nbytes - self.committed) // GRANULARITY) * GRANULARITY
        ledger.note("cuMemMap", committed=size)
        self.committed += size
        self._held[0] = self.committed
        device_memory.add(size)

    def array(self, dtype: Any, shape: tuple[int, ...]) -> ndarray:
        count = math.prod(shape) * np.dtype(dtype).itemsize
        assert count <= self.committed, f"an array of {count} bytes over {self.committed} committed"
        return _wrap(self._raw[:count].view(dtype).reshape(shape))


def _release(held: list[int]) -> None:
    device_memory.add(-held[0])


def growable_columns(widths: Any) -> tuple[Growable, ...]:
    """``ArrayBackend.growable_columns`` of the stand-in: room for as many rows as
    :data:`STANDIN_DEVICE_MEMORY` holds with all the columns together."""
    rows = STANDIN_DEVICE_MEMORY // max(1, sum(widths))
    return tuple(Growable(rows * w) for w in widths)


# The namespace's own functions above, in place of NumPy's (asanyarray is asarray).
_OWN = """
asarray array asanyarray ascontiguousarray asnumpy get_array_module einsum sort argsort argpartition
partition lexsort where bincount repeat delete searchsorted nonzero flatnonzero compress ndarray ufunc
"""


def _namespace() -> types.ModuleType:
    ns = types.ModuleType("cupy_standin", "A CuPy 14-like namespace on the CPU (tests/standin.py).")
    shape_syncs = set(_SHAPE_SYNCS.split())
    for name in _FUNCTION_SIGS:
        if hasattr(np, name):  # a few CuPy names are gone from NumPy 2 (row_stack...)
            setattr(ns, name, _counted(name, int(name in shape_syncs)))
    for name in _UFUNCS.split():
        obj = getattr(np, name)
        setattr(ns, name, ufunc(name) if isinstance(obj, np.ufunc) else _counted(name, 0))
    mine = globals()
    for name in _OWN.split():
        setattr(ns, name, mine["asarray" if name == "asanyarray" else name])
    for name in _NUMPY_TYPES.split():
        setattr(ns, name, getattr(np, name))
    for name in _EXCEPTIONS.split():
        setattr(ns, name, getattr(np.exceptions, name))
    for name, value in _CONSTANTS.items():
        setattr(ns, name, value)
    cuda = types.ModuleType("cupy_standin.cuda")
    cuda.Device = _Device  # type: ignore[attr-defined]
    cuda.Stream = _Stream  # type: ignore[attr-defined]
    cuda.Event = _Event  # type: ignore[attr-defined]
    cuda.alloc_pinned_memory = alloc_pinned_memory  # type: ignore[attr-defined]
    ns.cuda = cuda  # type: ignore[attr-defined]
    return ns


xp = _namespace()


def standin_backend(growable: bool = True) -> ArrayBackend:
    """An :class:`~iqdb.kernels.ArrayBackend` on the stand-in, as ``gpu_backend(0)`` builds one for
    CuPy (the GPU's profile): ``asarray`` counts an upload, ``to_host`` a download (through ``xp``).
    ``growable=False``: a device that cannot grow memory in place (no CUDA virtual memory)."""
    return ArrayBackend(
        "cuda:0",
        xp,
        lambda: SERIAL,
        None,
        device_index=0,
        fixed_shape=True,
        profile=GPU_PROFILE,
        growable_columns=growable_columns if growable else None,
    )
