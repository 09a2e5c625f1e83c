"""iqdb as a LangChain vector store (``pip install "iqdb[langchain]"``).

>>> from langchain_core.embeddings import DeterministicFakeEmbedding
>>> from iqdb.integrations.langchain import IqdbVectorStore
>>> store = IqdbVectorStore(DeterministicFakeEmbedding(size=8))
>>> store.add_texts(["apples", "pears"], [{"kind": "fruit"}, {"kind": "fruit"}], ids=["a", "p"])
['a', 'p']
>>> [doc.id for doc in store.similarity_search("apples", k=1, filter={"kind": "fruit"})]
['a']
>>> store.close()

``IqdbVectorStore(embedding, path)`` keeps the documents in a durable database in directory
``path``; without ``path`` they live in memory. Each document is one iqdb record: the embedding
is its vector, and its payload holds the LangChain id, the page content and the metadata apart
(``{"key": id, "text": page_content, "metadata": {...}}``), so no key of the adapter's ever shows
up in a document's metadata and a metadata key named ``id`` is the user's own.

String ids map onto iqdb's integer ids by a 63-bit hash, checked against the stored string on
every read and write: a collision raises :class:`~iqdb.integrations.IdCollision`, never
overwrites. Filters (``filter=``) are iqdb filters, or their Mongo-style dict form, over the
metadata: ``{"year": {"$gte": 2020}, "$or": [{"kind": "doc"}, {"kind": "note"}]}``.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

import iqdb
from iqdb._errors import InvalidArgument
from iqdb._values import coerce_metric

from ._common import (
    IdCollision,
    check_key,
    payload_of,
    relevance_fn,
    string_id,
    to_iqdb_filter,
    user_filter_dict,
)

try:
    from langchain_core.documents import Document
    from langchain_core.embeddings import Embeddings
    from langchain_core.vectorstores import VectorStore
    from langchain_core.vectorstores.utils import maximal_marginal_relevance
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        'iqdb.integrations.langchain needs langchain-core: pip install "iqdb[langchain]"'
    ) from exc

__all__ = ["IdCollision", "IqdbVectorStore"]

_KEY = "key"  # the LangChain id, checked against the hash on every read
_TEXT = "text"
_META = "metadata"
_META_PREFIX = _META + "."


class IqdbVectorStore(VectorStore):  # type: ignore[misc]  # (Any where langchain-core is absent)
    """A LangChain :class:`~langchain_core.vectorstores.VectorStore` backed by iqdb.

    Parameters
    ----------
    embedding
        The LangChain embedding model that turns texts (documents and queries) into vectors.
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

    def __init__(
        self,
        embedding: Embeddings,
        path: str | None = None,
        *,
        metric: iqdb.DistanceMetric | str = "cosine",
        device: str = "auto",
    ) -> None:
        self._embedding = embedding
        self._metric = coerce_metric(metric)
        self._db = iqdb.open_in_memory(device=device) if path is None else iqdb.open(path, device=device)
        # add_* checks for collisions before it writes; LangChain's async defaults call it from
        # a thread pool, so the check and the write are one step.
        self._write_lock = threading.Lock()

    # -- lifecycle ------------------------------------------------------------------------
    @property
    def client(self) -> iqdb.Iqdb:
        """The iqdb database handle underneath."""
        return self._db

    @property
    def embeddings(self) -> Embeddings:
        """The embedding model."""
        return self._embedding

    @property
    def metric(self) -> iqdb.DistanceMetric:
        """The distance metric searches use."""
        return self._metric

    def close(self) -> None:
        """Close the database (a durable one writes its snapshot). Closing again does nothing."""
        self._db.close()

    def __enter__(self) -> IqdbVectorStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writes ---------------------------------------------------------------------------
    @classmethod
    def from_texts(
        cls,
        texts: list[str],
        embedding: Embeddings,
        metadatas: list[dict[str, Any]] | None = None,
        *,
        ids: list[str] | None = None,
        path: str | None = None,
        metric: iqdb.DistanceMetric | str = "cosine",
        device: str = "auto",
        **kwargs: Any,
    ) -> IqdbVectorStore:
        """A new store (in memory, or durable in ``path``) holding ``texts``.

        Raises
        ------
        InvalidArgument
            An unknown keyword argument; as :meth:`add_texts` otherwise.
        """
        if kwargs:
            raise InvalidArgument(f"unknown argument(s) for from_texts: {', '.join(sorted(kwargs))}")
        store = cls(embedding, path, metric=metric, device=device)
        try:
            store.add_texts(texts, metadatas, ids=ids)
        except BaseException:
            store.close()
            raise
        return store

    def add_texts(
        self,
        texts: Iterable[str],
        metadatas: list[dict[str, Any]] | None = None,
        *,
        ids: list[str] | None = None,
        **kwargs: Any,
    ) -> list[str]:
        """Embed ``texts`` and store them; the ids, as given (``uuid4`` strings where absent).

        Re-adding an id replaces that document (text, metadata and vector).

        Raises
        ------
        InvalidArgument
            ``metadatas`` or ``ids`` of another length than ``texts``; a non-string id;
            metadata that is not a valid iqdb payload (naming the key); an unknown keyword.
        IdCollision
            An id hashes to the iqdb id of another stored (or given) id.
        DimensionMismatch
            The embeddings' dimension differs from the database's.
        """
        if kwargs:
            raise InvalidArgument(f"unknown argument(s) for add_texts: {', '.join(sorted(kwargs))}")
        text_list = list(texts)
        n = len(text_list)
        if metadatas is not None and len(metadatas) != n:
            raise InvalidArgument(f"got {n} texts but {len(metadatas)} metadatas")
        if ids is not None and len(ids) != n:
            raise InvalidArgument(f"got {n} texts but {len(ids)} ids")
        docs = [
            Document(
                page_content=text,
                metadata={} if metadatas is None else metadatas[i],
                id=None if ids is None else ids[i],
            )
            for i, text in enumerate(text_list)
        ]
        return self._add(docs)

    def add_documents(self, documents: list[Document], **kwargs: Any) -> list[str]:
        """Store ``documents``; their ids (``ids=`` wins over ``Document.id``; ``uuid4`` where
        neither gives one). The documents are not changed.

        Raises
        ------
        As :meth:`add_texts`.
        """
        ids = kwargs.pop("ids", None)
        if kwargs:
            raise InvalidArgument(f"unknown argument(s) for add_documents: {', '.join(sorted(kwargs))}")
        docs = list(documents)
        if ids is not None:
            if len(ids) != len(docs):
                raise InvalidArgument(f"got {len(docs)} documents but {len(ids)} ids")
            docs = [
                Document(page_content=d.page_content, metadata=d.metadata, id=i) for d, i in zip(docs, ids)
            ]
        return self._add(docs)

    def _add(self, docs: list[Document]) -> list[str]:
        if not docs:
            return []
        keys = [d.id or str(uuid.uuid4()) for d in docs]  # as LangChain's own stores: '' is no id
        rids = [string_id(k) for k in keys]
        payloads = []
        for key, doc in zip(keys, docs):
            if not isinstance(doc.metadata, dict):
                raise InvalidArgument(f"metadata of document {key!r} must be a dict")
            payloads.append({_KEY: key, _TEXT: doc.page_content, _META: doc.metadata})
        given: dict[int, str] = {}
        for key, rid in zip(keys, rids):
            if given.setdefault(rid, key) != key:
                raise IdCollision(key, rid)
        vectors = np.asarray(
            self._embedding.embed_documents([d.page_content for d in docs]), dtype=np.float32
        )
        with self._write_lock:
            for key, rid in zip(keys, rids):
                record = self._db.get(rid)
                if record is not None:
                    check_key(key, rid, payload_of(record).get(_KEY))
            self._db.upsert_many(rids, vectors, payloads)
        return keys

    def delete(self, ids: list[str] | None = None, **kwargs: Any) -> bool:
        """Delete the documents with these ids (unknown ids are skipped), or those that
        ``filter=`` matches, or (both given) the documents with these ids that it matches, in
        one write. ``True`` if any document was deleted.

        Raises
        ------
        InvalidArgument
            Neither ``ids`` nor ``filter`` given (deleting everything takes
            ``filter={}``); a non-string id; a malformed filter; an unknown keyword.
        """
        flt = kwargs.pop("filter", None)
        if kwargs:
            raise InvalidArgument(f"unknown argument(s) for delete: {', '.join(sorted(kwargs))}")
        if ids is None and flt is None:
            raise InvalidArgument("delete needs ids or filter= (filter={} deletes every document)")
        conditions: list[dict[str, Any]] = []
        if ids is not None:
            for key in ids:
                string_id(key)  # the same type check as everywhere else
            # By the stored string, not the hash: another id's record at a colliding integer
            # id is not this id's to delete.
            conditions.append({_KEY: {"$in": list(ids)}})
        if flt is not None:
            conditions.append(user_filter_dict(flt, _META_PREFIX))
        return self._db.delete_where({"$and": conditions}) > 0  # one write: all or none

    # -- reads ----------------------------------------------------------------------------
    def get_by_ids(self, ids: Sequence[str], /) -> list[Document]:
        """The stored documents with these ids, in the given order; unknown ids are skipped.

        Raises
        ------
        InvalidArgument
            A non-string id.
        IdCollision
            The iqdb record an id maps to holds another string id.
        """
        docs = []
        for key in ids:
            rid = string_id(key)
            record = self._db.get(rid)
            if record is None:
                continue
            payload = payload_of(record)
            check_key(key, rid, payload.get(_KEY))
            docs.append(_document(payload))
        return docs

    def similarity_search(self, query: str, k: int = 4, filter: Any = None, **kwargs: Any) -> list[Document]:
        """The ``k`` documents closest to ``query`` (among those ``filter`` matches).

        Raises
        ------
        InvalidArgument
            A negative ``k``; a malformed filter; an unknown keyword.
        """
        return [doc for doc, _ in self.similarity_search_with_score(query, k, filter, **kwargs)]

    def similarity_search_with_score(
        self, query: str, k: int = 4, filter: Any = None, **kwargs: Any
    ) -> list[tuple[Document, float]]:
        """As :meth:`similarity_search`, each with its iqdb distance (smaller is closer).

        Raises
        ------
        As :meth:`similarity_search`.
        """
        return self.similarity_search_with_score_by_vector(
            self._embedding.embed_query(query), k, filter, **kwargs
        )

    def similarity_search_by_vector(
        self, embedding: list[float], k: int = 4, filter: Any = None, **kwargs: Any
    ) -> list[Document]:
        """The ``k`` documents closest to ``embedding``.

        Raises
        ------
        As :meth:`similarity_search`; DimensionMismatch for an embedding of another dimension.
        """
        return [doc for doc, _ in self.similarity_search_with_score_by_vector(embedding, k, filter, **kwargs)]

    def similarity_search_with_score_by_vector(
        self, embedding: Sequence[float], k: int = 4, filter: Any = None, **kwargs: Any
    ) -> list[tuple[Document, float]]:
        """The ``k`` documents closest to ``embedding``, with their distances.

        Raises
        ------
        As :meth:`similarity_search_by_vector`.
        """
        if kwargs:
            raise InvalidArgument(f"unknown argument(s) for search: {', '.join(sorted(kwargs))}")
        flt = to_iqdb_filter(filter, _META_PREFIX)
        results = self._db.search(embedding, k, self._metric, filter=flt)
        return [(_document(payload_of(r)), r.score) for r in results]

    def _select_relevance_score_fn(self) -> Callable[[float], float]:
        # iqdb's distances, not LangChain's unit-vector assumptions (1 - d/sqrt(2) for L2).
        return relevance_fn(self._metric)

    def max_marginal_relevance_search(
        self,
        query: str,
        k: int = 4,
        fetch_k: int = 20,
        lambda_mult: float = 0.5,
        **kwargs: Any,
    ) -> list[Document]:
        """``k`` documents chosen for closeness to ``query`` and diversity among themselves,
        from the ``fetch_k`` closest (``filter=`` applies to those).

        Raises
        ------
        As :meth:`similarity_search`.
        """
        return self.max_marginal_relevance_search_by_vector(
            self._embedding.embed_query(query), k, fetch_k, lambda_mult, **kwargs
        )

    def max_marginal_relevance_search_by_vector(
        self,
        embedding: list[float],
        k: int = 4,
        fetch_k: int = 20,
        lambda_mult: float = 0.5,
        **kwargs: Any,
    ) -> list[Document]:
        """As :meth:`max_marginal_relevance_search`, for a query vector.

        Raises
        ------
        As :meth:`similarity_search_by_vector`.
        """
        flt = kwargs.pop("filter", None)
        if kwargs:
            raise InvalidArgument(f"unknown argument(s) for search: {', '.join(sorted(kwargs))}")
        results = self._db.search(embedding, fetch_k, self._metric, filter=to_iqdb_filter(flt, _META_PREFIX))
        pairs = [(r, self._db.get(r.id)) for r in results]
        found = [(r, rec) for r, rec in pairs if rec is not None]  # not deleted meanwhile
        if not found:
            return []
        chosen = maximal_marginal_relevance(
            np.asarray(embedding, dtype=np.float32),
            [rec.vector.tolist() for _, rec in found],
            lambda_mult=lambda_mult,
            k=k,
        )
        return [_document(payload_of(found[i][0])) for i in chosen]


def _document(payload: Any) -> Document:
    metadata = payload.get(_META)
    return Document(
        id=payload.get(_KEY),
        page_content=payload.get(_TEXT, ""),
        metadata=dict(metadata) if isinstance(metadata, dict) else {},
    )
