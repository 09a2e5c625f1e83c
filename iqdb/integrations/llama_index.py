"""iqdb as a LlamaIndex vector store (``pip install "iqdb[llama-index]"``).

>>> from llama_index.core.schema import TextNode
>>> from llama_index.core.vector_stores.types import VectorStoreQuery
>>> from iqdb.integrations.llama_index import IqdbVectorStore
>>> store = IqdbVectorStore()
>>> store.add([TextNode(id_="n1", text="hello", embedding=[1.0, 0.0], metadata={"lang": "en"})])
['n1']
>>> store.query(VectorStoreQuery(query_embedding=[1.0, 0.1], similarity_top_k=1)).ids
['n1']
>>> store.close()

``IqdbVectorStore(path)`` keeps the nodes in a durable database in directory ``path``; without
``path`` they live in memory. Use it as any LlamaIndex vector store, e.g.
``VectorStoreIndex.from_documents(docs, storage_context=StorageContext.from_defaults(
vector_store=store))``. Each node is one iqdb record: its embedding is the vector, and its payload
holds apart the node id, the source document's id, the text, the metadata and the rest of the
serialised node (``{"key", "doc", "text", "metadata", "node"}``), so metadata filters see only the
node's own metadata.

Node ids are strings; they map onto iqdb's integer ids by a 63-bit hash checked against the stored
string, so a collision raises :class:`~iqdb.integrations.IdCollision`, never overwrites.

``MetadataFilters`` become iqdb filters: ``== != > >= < <= in nin contains any all is_empty`` and
the conditions ``and``, ``or`` and ``not`` (none of the filters holds), nested to any depth.
``text_match`` and ``text_match_insensitive`` have no iqdb filter and raise
:class:`~iqdb.InvalidArgument`. iqdb's filter semantics apply: a comparison on a missing key is
false (``!=`` and ``nin`` included, where LlamaIndex's in-memory store counts them true), and
values compare within their kind only (``2 == 2.0``, but ``"2" != 2``).

Similarities are higher-is-better: the cosine similarity ``1 - d`` for ``metric="cosine"``, the
inner product for ``"dot"`` and ``1/(1 + d)`` for ``"l2"``.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

import iqdb
from iqdb._errors import InvalidArgument
from iqdb._values import coerce_metric

from ._common import (
    IdCollision,
    check_key,
    matching,
    payload_of,
    similarity_fn,
    string_id,
    to_iqdb_filter,
)

try:
    from llama_index.core.bridge.pydantic import PrivateAttr
    from llama_index.core.schema import BaseNode
    from llama_index.core.vector_stores.types import (
        BasePydanticVectorStore,
        FilterCondition,
        FilterOperator,
        MetadataFilter,
        MetadataFilters,
        VectorStoreQuery,
        VectorStoreQueryMode,
        VectorStoreQueryResult,
    )
    from llama_index.core.vector_stores.utils import metadata_dict_to_node, node_to_metadata_dict
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        'iqdb.integrations.llama_index needs llama-index-core: pip install "iqdb[llama-index]"'
    ) from exc

__all__ = ["IdCollision", "IqdbVectorStore", "to_filter_dict"]

_KEY = "key"  # the node id, checked against the hash on every read by id
_DOC = "doc"  # the source document's id (ref_doc_id), or None
_TEXT = "text"
_META = "metadata"
_NODE = "node"  # LlamaIndex's serialised node (_node_content, _node_type), text removed
_META_PREFIX = _META + "."

_COMPARISONS = {
    FilterOperator.EQ: "$eq",
    FilterOperator.NE: "$ne",
    FilterOperator.GT: "$gt",
    FilterOperator.GTE: "$gte",
    FilterOperator.LT: "$lt",
    FilterOperator.LTE: "$lte",
    FilterOperator.IN: "$in",
    FilterOperator.NIN: "$nin",
    FilterOperator.CONTAINS: "$contains",
}


class IqdbVectorStore(BasePydanticVectorStore):  # type: ignore[misc]  # (Any without llama-index)
    """A LlamaIndex vector store backed by iqdb (``stores_text=True``).

    Parameters
    ----------
    path
        ``None`` (the default): an in-memory database. Otherwise the directory of a durable
        database, created if absent and reopened if present.
    metric
        ``"cosine"`` (default), ``"l2"`` or ``"dot"``, or a :class:`iqdb.DistanceMetric`.
    device
        Where searches run: ``"auto"``, ``"cpu"``, ``"gpu"``, ``"cuda"`` or ``"cuda:N"``.

    Raises
    ------
    InvalidArgument
        An unknown metric.
    InvalidConfig, DeviceUnavailable, Locked, Corrupt, StorageError
        As :meth:`iqdb.Iqdb.open` / :meth:`iqdb.Iqdb.open_in_memory`.
    """

    stores_text: bool = True

    path: str | None = None
    metric: str = "cosine"
    device: str = "auto"

    _db: iqdb.Iqdb = PrivateAttr()
    _metric: iqdb.DistanceMetric = PrivateAttr()
    _write_lock: threading.Lock = PrivateAttr()

    def __init__(
        self,
        path: str | None = None,
        *,
        metric: iqdb.DistanceMetric | str = "cosine",
        device: str = "auto",
    ) -> None:
        met = coerce_metric(metric)
        where = None if path is None else str(path)
        super().__init__(stores_text=True, path=where, metric=met.value, device=device)  # type: ignore[call-arg]
        self._metric = met
        self._db = iqdb.open_in_memory(device=device) if where is None else iqdb.open(where, device=device)
        self._write_lock = threading.Lock()

    @classmethod
    def class_name(cls) -> str:
        """LlamaIndex's name for this store."""
        return "IqdbVectorStore"

    @property
    def client(self) -> iqdb.Iqdb:
        """The iqdb database handle underneath."""
        return self._db

    def close(self) -> None:
        """Close the database (a durable one writes its snapshot). Closing again does nothing."""
        self._db.close()

    # -- writes ---------------------------------------------------------------------------
    def add(self, nodes: Sequence[BaseNode], **add_kwargs: Any) -> list[str]:
        """Store ``nodes`` (each with its embedding); their ids. Re-adding an id replaces it.

        Raises
        ------
        InvalidArgument
            A node without an embedding; metadata that is not a valid iqdb payload (naming the
            key).
        IdCollision
            A node id hashes to the iqdb id of another stored (or given) node id.
        DimensionMismatch
            The embeddings' dimension differs from the database's.
        """
        if not nodes:
            return []
        keys = [node.node_id for node in nodes]
        rids = [string_id(key) for key in keys]
        given: dict[int, str] = {}
        for key, rid in zip(keys, rids):
            if given.setdefault(rid, key) != key:
                raise IdCollision(key, rid)
        vectors = []
        payloads = []
        for node in nodes:
            if node.embedding is None:
                raise InvalidArgument(f"node {node.node_id!r} has no embedding")
            vectors.append(node.embedding)
            serialised = node_to_metadata_dict(node, remove_text=True, flat_metadata=False)
            payloads.append(
                {
                    _KEY: node.node_id,
                    _DOC: node.ref_doc_id,
                    _TEXT: node.get_content(),
                    _META: dict(node.metadata),
                    _NODE: {name: serialised[name] for name in ("_node_content", "_node_type")},
                }
            )
        matrix = np.asarray(vectors, dtype=np.float32)
        with self._write_lock:
            for key, rid in zip(keys, rids):
                record = self._db.get(rid)
                if record is not None:
                    check_key(key, rid, payload_of(record).get(_KEY))
            self._db.upsert_many(rids, matrix, payloads)
        return keys

    def delete(self, ref_doc_id: str, **delete_kwargs: Any) -> None:
        """Delete every node whose source document is ``ref_doc_id``."""
        self._delete_matching({_DOC: {"$eq": ref_doc_id}})

    def delete_nodes(
        self,
        node_ids: list[str] | None = None,
        filters: MetadataFilters | None = None,
        **delete_kwargs: Any,
    ) -> None:
        """Delete the nodes with these ids that ``filters`` matches (either may be ``None``:
        no condition; both ``None`` deletes every node, as LlamaIndex's own store does).

        Raises
        ------
        InvalidArgument
            A filter operator iqdb cannot express (``text_match``, ``text_match_insensitive``).
        """
        if node_ids is not None and not node_ids:
            return  # no ids: nothing to delete (not "no restriction", as in a query)
        self._delete_matching(self._where(node_ids, None, filters))

    def clear(self) -> None:
        """Delete every node."""
        self._delete_matching({})

    def _delete_matching(self, where: dict[str, Any]) -> None:
        self._db.delete_where(where)  # one write: all of them or none

    # -- reads ----------------------------------------------------------------------------
    def get_nodes(
        self,
        node_ids: list[str] | None = None,
        filters: MetadataFilters | None = None,
    ) -> list[BaseNode]:
        """The stored nodes with these ids (in that order; unknown ids skipped) that ``filters``
        matches; every node ``filters`` matches when ``node_ids`` is ``None``.

        Raises
        ------
        IdCollision
            The record a node id maps to holds another node id.
        InvalidArgument
            A filter operator iqdb cannot express.
        """
        if node_ids is None:
            return [_node(payload_of(r)) for r in matching(self._db, self._filter(None, None, filters))]
        if not node_ids:
            return []
        for key in node_ids:
            rid = string_id(key)
            record = self._db.get(rid)
            if record is not None:
                check_key(key, rid, payload_of(record).get(_KEY))
        found: dict[str, Mapping[str, Any]] = {
            str(payload_of(r).get(_KEY)): payload_of(r)
            for r in matching(self._db, self._filter(node_ids, None, filters))
        }
        return [_node(found[key]) for key in node_ids if key in found]

    def query(self, query: VectorStoreQuery, **kwargs: Any) -> VectorStoreQueryResult:
        """The ``similarity_top_k`` nodes closest to ``query.query_embedding`` among those that
        ``filters``, ``node_ids`` and ``doc_ids`` allow (an empty list of ids restricts nothing);
        similarities higher-is-better.

        Raises
        ------
        InvalidArgument
            No query embedding; a query mode other than the default; a filter operator iqdb
            cannot express.
        DimensionMismatch
            The query's dimension differs from the database's.
        """
        if query.mode != VectorStoreQueryMode.DEFAULT:
            raise InvalidArgument(f"query mode {query.mode.value!r} is not supported (only 'default')")
        if query.query_embedding is None:
            raise InvalidArgument("the query has no query_embedding")
        flt = self._filter(query.node_ids, query.doc_ids, query.filters)
        results = self._db.search(query.query_embedding, query.similarity_top_k, self._metric, filter=flt)
        score = similarity_fn(self._metric)
        return VectorStoreQueryResult(
            nodes=[_node(payload_of(r)) for r in results],
            similarities=[score(r.score) for r in results],
            ids=[str(payload_of(r).get(_KEY)) for r in results],
        )

    # -- filters --------------------------------------------------------------------------
    @staticmethod
    def _where(
        node_ids: list[str] | None, doc_ids: list[str] | None, filters: MetadataFilters | None
    ) -> dict[str, Any]:
        parts: list[dict[str, Any]] = []
        # An empty list restricts nothing: VectorStoreIndex's retriever passes node_ids=[] for a
        # store that keeps the text (its own node list is then empty), as the other such stores
        # read it.
        if node_ids:
            parts.append({_KEY: {"$in": list(node_ids)}})
        if doc_ids:
            parts.append({_DOC: {"$in": list(doc_ids)}})
        if filters is not None and filters.filters:
            parts.append(to_filter_dict(filters, _META_PREFIX))
        return {"$and": parts} if parts else {}

    def _filter(
        self, node_ids: list[str] | None, doc_ids: list[str] | None, filters: MetadataFilters | None
    ) -> Any:
        where = self._where(node_ids, doc_ids, filters)
        return to_iqdb_filter(where, "") if where else None


def to_filter_dict(filters: MetadataFilters, prefix: str = "") -> dict[str, Any]:
    """LlamaIndex ``MetadataFilters`` as iqdb's Mongo-style filter dict, field keys under
    ``prefix`` (``"metadata."`` inside the store).

    >>> from llama_index.core.vector_stores.types import MetadataFilter, MetadataFilters
    >>> to_filter_dict(MetadataFilters(filters=[MetadataFilter(key="year", value=2020, operator=">=")]))
    {'$and': [{'year': {'$gte': 2020}}]}

    Raises
    ------
    InvalidArgument
        An operator iqdb's filters cannot express (``text_match``, ``text_match_insensitive``),
        or a list operator (``in``, ``nin``, ``any``, ``all``) given a single value.
    """
    parts = [
        to_filter_dict(f, prefix) if isinstance(f, MetadataFilters) else _one(f, prefix)
        for f in filters.filters
    ]
    condition = filters.condition or FilterCondition.AND
    if condition == FilterCondition.AND:
        return {"$and": parts}
    if condition == FilterCondition.OR:
        return {"$or": parts}
    if condition == FilterCondition.NOT:
        return {"$not": {"$or": parts}}  # LlamaIndex's NOT: none of the filters holds
    raise InvalidArgument(f"unknown filter condition {condition!r}")


def _one(f: MetadataFilter, prefix: str) -> dict[str, Any]:
    key, op, value = prefix + f.key, f.operator, f.value
    if op in (FilterOperator.IN, FilterOperator.NIN, FilterOperator.ANY, FilterOperator.ALL) and not (
        isinstance(value, list)
    ):
        raise InvalidArgument(f"filter operator {op.value!r} on {f.key!r} takes a list of values")
    if op in _COMPARISONS:
        return {key: {_COMPARISONS[op]: value}}
    if op == FilterOperator.ANY:
        return {"$or": [{key: {"$contains": v}} for v in value]}  # type: ignore[union-attr]
    if op == FilterOperator.ALL:
        return {"$and": [{key: {"$contains": v}} for v in value]}  # type: ignore[union-attr]
    if op == FilterOperator.IS_EMPTY:
        # LlamaIndex: the key is absent, or holds None, "" or [].
        return {
            "$or": [
                {"$not": {key: {"$exists": True}}},
                {key: {"$eq": None}},
                {key: {"$eq": ""}},
                {key: {"$eq": []}},
            ]
        }
    raise InvalidArgument(
        f"filter operator {op.value!r} on {f.key!r} has no iqdb filter "
        "(iqdb filters compare whole values; text_match needs substring search)"
    )


def _node(payload: Any) -> BaseNode:
    node = metadata_dict_to_node(dict(payload.get(_NODE) or {}), text=payload.get(_TEXT))
    # The stored metadata is the node's own; the serialised copy says the same, but this is
    # what filters saw.
    metadata = payload.get(_META)
    if isinstance(metadata, dict):
        node.metadata = dict(metadata)
    return node
