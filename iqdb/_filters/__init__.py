"""Declarative filters: values (``Field``, ``Filter``), payload column indexes, compiled masks.

>>> from iqdb import Field
>>> (Field("kind") == "doc") & Field("year").between(2020, 2024)
(Field('kind') == 'doc') & (Field('year') >= 2020) & (Field('year') <= 2024)
"""

from __future__ import annotations

from ._columns import PayloadIndex
from ._compile import MaskCache, evaluate, value_equal
from ._expr import Field, Filter, FilterLike, coerce_filter

__all__ = [
    "Field",
    "Filter",
    "FilterLike",
    "MaskCache",
    "PayloadIndex",
    "coerce_filter",
    "evaluate",
    "value_equal",
]
