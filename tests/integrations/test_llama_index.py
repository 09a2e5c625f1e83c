"""The LlamaIndex adapter: llama-index-core's own simple-store checks, ported, and an end-to-end
index over a durable iqdb store.

The ``TestSimpleStoreBehaviour`` cases follow llama-index-core's
``tests/vector_stores/test_simple.py`` (same nodes, queries and expected answers), run against
iqdb in memory and durable on the CPU, and durable on a GPU where there is one. Where iqdb's
contract differs (``text_match`` has no iqdb filter; a comparison on a missing key is false) the
test says so.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("llama_index.core", reason="needs llama-index-core: pip install 'iqdb[llama-index]'")

from llama_index.core import Document, StorageContext, VectorStoreIndex
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.schema import NodeRelationship, RelatedNodeInfo, TextNode
from llama_index.core.vector_stores.types import (
    ExactMatchFilter,
    FilterCondition,
    FilterOperator,
    MetadataFilter,
    MetadataFilters,
    VectorStoreQuery,
    VectorStoreQueryMode,
)

import iqdb
from iqdb.integrations import IdCollision
from iqdb.integrations._common import string_id
from iqdb.integrations.llama_index import IqdbVectorStore, to_filter_dict

A = "AF3BE6C4-5F43-4D74-B075-6B0E07900DE8"  # weight 1, rank a
B = "7D9CD555-846C-445C-A9DD-F8924A01411D"  # weight 2, rank c
C = "452D24AB-F185-414C-A352-590B4B9EE51B"  # weight 3, rank c


def _nodes() -> list[TextNode]:
    rows = [
        (A, [1.0, 0.0], "test-0", 1.0, "a", ["medium", "high"], "6FTR78Yun"),
        (B, [0.0, 1.0], "test-1", 2.0, "c", ["medium"], "6FTR78Ygl"),
        (C, [1.0, 1.0], "test-2", 3.0, "c", ["low", "medium", "high"], "6FTR78Ztl"),
    ]
    return [
        TextNode(
            text="lorem ipsum",
            id_=node_id,
            embedding=emb,
            relationships={NodeRelationship.SOURCE: RelatedNodeInfo(node_id=doc)},
            metadata={"weight": weight, "rank": rank, "quality": quality, "identifier": ident},
        )
        for node_id, emb, doc, weight, rank, quality, ident in rows
    ]


@pytest.fixture(
    params=[
        pytest.param(("memory", "cpu"), id="memory-cpu"),
        pytest.param(("durable", "cpu"), id="durable-cpu"),
        pytest.param(("durable", "cuda"), id="durable-gpu", marks=pytest.mark.gpu),
    ]
)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[IqdbVectorStore]:
    kind, device = request.param
    path = None if kind == "memory" else str(tmp_path / "db")
    s = IqdbVectorStore(path, device=device)
    s.add(_nodes())
    try:
        yield s
    finally:
        s.close()


def _ids(store: IqdbVectorStore, filters: MetadataFilters | None = None, k: int = 3, **kw: Any) -> list[str]:
    result = store.query(
        VectorStoreQuery(query_embedding=[1.0, 1.0], similarity_top_k=k, filters=filters, **kw)
    )
    assert result.ids is not None
    return result.ids


def _f(key: str, op: FilterOperator, value: Any) -> MetadataFilters:
    return MetadataFilters(filters=[MetadataFilter(key=key, operator=op, value=value)])


class TestSimpleStoreBehaviour:
    def test_query_without_filters_returns_all_rows_sorted_by_similarity(
        self, store: IqdbVectorStore
    ) -> None:
        ids = _ids(store)
        assert sorted(ids) == sorted([A, B, C])
        assert ids[0] == C

    def test_query_with_filters_returns_multiple_matches(self, store: IqdbVectorStore) -> None:
        filters = MetadataFilters(filters=[ExactMatchFilter(key="rank", value="c")])
        assert _ids(store, filters) == [C, B]

    def test_query_with_filter_applies_top_k(self, store: IqdbVectorStore) -> None:
        filters = MetadataFilters(filters=[ExactMatchFilter(key="rank", value="c")])
        assert _ids(store, filters, k=1) == [C]

    def test_query_with_filter_applies_node_id_filter(self, store: IqdbVectorStore) -> None:
        filters = MetadataFilters(filters=[ExactMatchFilter(key="rank", value="c")])
        assert _ids(store, filters, node_ids=[C]) == [C]
        assert _ids(store, None, node_ids=[A, B]) == [A, B] or _ids(store, None, node_ids=[A, B]) == [B, A]
        assert _ids(store, filters, node_ids=[A]) == []

    def test_query_with_doc_ids(self, store: IqdbVectorStore) -> None:
        assert _ids(store, None, doc_ids=["test-1"]) == [B]
        assert sorted(_ids(store, None, doc_ids=["test-0", "test-2"])) == sorted([A, C])
        assert _ids(store, None, doc_ids=["nope"]) == []

    def test_query_with_exact_filters_returns_single_match(self, store: IqdbVectorStore) -> None:
        filters = MetadataFilters(
            filters=[ExactMatchFilter(key="rank", value="c"), ExactMatchFilter(key="weight", value=2.0)]
        )
        assert _ids(store, filters, k=1) == [B]

    def test_query_with_contradictive_filter_returns_no_matches(self, store: IqdbVectorStore) -> None:
        filters = MetadataFilters(
            filters=[ExactMatchFilter(key="weight", value=2), ExactMatchFilter(key="weight", value=3)]
        )
        assert _ids(store, filters) == []

    def test_int_and_float_compare_as_numbers(self, store: IqdbVectorStore) -> None:
        assert _ids(store, _f("weight", FilterOperator.EQ, 2)) == [B]

    def test_query_with_filter_on_unknown_field_returns_no_matches(self, store: IqdbVectorStore) -> None:
        assert _ids(store, MetadataFilters(filters=[ExactMatchFilter(key="unknown_field", value="c")])) == []

    def test_delete_removes_document_from_query_results(self, store: IqdbVectorStore) -> None:
        store.delete("test-1")
        assert _ids(store, k=2) == [C, A]
        assert len(store.client) == 2

    def test_query_with_filters_with_filter_condition(self, store: IqdbVectorStore) -> None:
        both = [ExactMatchFilter(key="rank", value="c"), ExactMatchFilter(key="weight", value=1.0)]
        assert len(_ids(store, MetadataFilters(filters=both, condition=FilterCondition.OR))) == 3
        assert len(_ids(store, MetadataFilters(filters=both, condition=FilterCondition.AND))) == 0

    def test_query_with_not_filter_returns_matches(self, store: IqdbVectorStore) -> None:
        filters = MetadataFilters(
            filters=[MetadataFilter(key="rank", operator=FilterOperator.EQ, value="a")],
            condition=FilterCondition.NOT,
        )
        assert sorted(_ids(store, filters)) == sorted([B, C])

    def test_nested_filters(self, store: IqdbVectorStore) -> None:
        inner = MetadataFilters(
            filters=[
                MetadataFilter(key="weight", operator=FilterOperator.GT, value=2.5),
                ExactMatchFilter(key="rank", value="a"),
            ],
            condition=FilterCondition.OR,
        )
        filters = MetadataFilters(
            filters=[inner, MetadataFilter(key="quality", operator=FilterOperator.CONTAINS, value="high")]
        )
        assert sorted(_ids(store, filters)) == sorted([A, C])

    @pytest.mark.parametrize(
        ("op", "value", "expected"),
        [
            (FilterOperator.EQ, 1.0, [A]),
            (FilterOperator.NE, 1.0, [B, C]),
            (FilterOperator.GT, 1.5, [B, C]),
            (FilterOperator.GTE, 1.0, [A, B, C]),
            (FilterOperator.LT, 1.1, [A]),
            (FilterOperator.LTE, 1.0, [A]),
            (FilterOperator.LTE, 2, [A, B]),
        ],
    )
    def test_comparison_operators_on_weight(
        self, store: IqdbVectorStore, op: FilterOperator, value: Any, expected: list[str]
    ) -> None:
        assert sorted(_ids(store, _f("weight", op, value))) == sorted(expected)

    @pytest.mark.parametrize(
        ("key", "op", "value", "expected"),
        [
            ("rank", FilterOperator.IN, ["a", "c"], [A, B, C]),
            ("rank", FilterOperator.IN, ["a"], [A]),
            ("rank", FilterOperator.NIN, ["c"], [A]),
            ("quality", FilterOperator.CONTAINS, "high", [A, C]),
            ("quality", FilterOperator.ANY, ["high", "low"], [A, C]),
            ("quality", FilterOperator.ANY, ["low"], [C]),
            ("quality", FilterOperator.ALL, ["medium", "high"], [A, C]),
            ("quality", FilterOperator.ALL, ["low", "high"], [C]),
            ("not_existed_key", FilterOperator.IS_EMPTY, None, [A, B, C]),
            ("rank", FilterOperator.IS_EMPTY, None, []),
        ],
    )
    def test_list_and_presence_operators(
        self, store: IqdbVectorStore, key: str, op: FilterOperator, value: Any, expected: list[str]
    ) -> None:
        assert sorted(_ids(store, _f(key, op, value))) == sorted(expected)

    def test_is_empty_matches_none_empty_string_and_empty_list(self, store: IqdbVectorStore) -> None:
        extra = [
            TextNode(text=str(i), id_=f"e{i}", embedding=[0.5, 0.5], metadata={"tag": value})
            for i, value in enumerate([None, "", [], "x", ["y"]])
        ]
        store.add(extra)
        result = _ids(store, _f("tag", FilterOperator.IS_EMPTY, None), k=10)
        assert sorted(result) == sorted([A, B, C, "e0", "e1", "e2"])

    @pytest.mark.parametrize("op", [FilterOperator.TEXT_MATCH, FilterOperator.TEXT_MATCH_INSENSITIVE])
    def test_text_match_has_no_iqdb_filter_and_says_so(
        self, store: IqdbVectorStore, op: FilterOperator
    ) -> None:
        # llama-index-core's test expects 2 substring matches; iqdb filters compare whole values.
        with pytest.raises(iqdb.InvalidArgument, match=op.value):
            _ids(store, _f("identifier", op, "6FTR78Y"))

    def test_list_operator_with_a_single_value_is_an_error(self, store: IqdbVectorStore) -> None:
        with pytest.raises(iqdb.InvalidArgument, match="'in' on 'rank'"):
            _ids(store, _f("rank", FilterOperator.IN, "a"))

    def test_clear(self, store: IqdbVectorStore) -> None:
        store.clear()
        assert _ids(store) == []
        assert len(store.client) == 0

    def test_delete_nodes(self, store: IqdbVectorStore) -> None:
        store.delete_nodes([A, B])
        assert _ids(store) == [C]

    def test_delete_nodes_with_filters(self, store: IqdbVectorStore) -> None:
        store.delete_nodes(filters=_f("rank", FilterOperator.EQ, "c"))
        assert _ids(store) == [A]
        store.delete_nodes([A], filters=_f("rank", FilterOperator.EQ, "c"))  # id and filter: both must hold
        assert _ids(store) == [A]

    def test_get_nodes(self, store: IqdbVectorStore) -> None:
        nodes = store.get_nodes([C, "unknown", A])
        assert [n.node_id for n in nodes] == [C, A]
        assert nodes[0].metadata == {
            "weight": 3.0,
            "rank": "c",
            "quality": ["low", "medium", "high"],
            "identifier": "6FTR78Ztl",
        }
        assert nodes[0].get_content() == "lorem ipsum"
        assert nodes[0].ref_doc_id == "test-2"
        by_filter = store.get_nodes(filters=_f("rank", FilterOperator.EQ, "c"))
        assert sorted(n.node_id for n in by_filter) == sorted([B, C])

    def test_similarities_are_higher_is_better(self, store: IqdbVectorStore) -> None:
        result = store.query(VectorStoreQuery(query_embedding=[1.0, 1.0], similarity_top_k=3))
        assert result.similarities is not None
        assert result.similarities == sorted(result.similarities, reverse=True)
        assert result.similarities[0] == pytest.approx(1.0)  # cosine similarity of equal directions
        assert result.nodes is not None
        assert [n.node_id for n in result.nodes] == result.ids


def test_re_adding_a_node_replaces_it() -> None:
    store = IqdbVectorStore(device="cpu")
    store.add([TextNode(id_="n", text="old", embedding=[1.0, 0.0], metadata={"v": 1})])
    store.add([TextNode(id_="n", text="new", embedding=[0.0, 1.0], metadata={"v": 2})])
    [node] = store.get_nodes(["n"])
    assert (node.get_content(), node.metadata) == ("new", {"v": 2})
    assert len(store.client) == 1
    store.close()


def test_id_collision_is_an_error_never_an_overwrite() -> None:
    store = IqdbVectorStore(device="cpu")
    # Another node id that landed on n1's integer id (as a 63-bit hash collision would).
    store.client.upsert(iqdb.Record(string_id("n1"), [1.0, 0.0], {"key": "other", "text": "x"}))
    with pytest.raises(IdCollision, match="'n1'"):
        store.add([TextNode(id_="n1", text="hello", embedding=[0.0, 1.0])])
    with pytest.raises(IdCollision):
        store.get_nodes(["n1"])
    assert store.client.get(string_id("n1")).payload["key"] == "other"  # type: ignore[union-attr]
    store.close()


def test_unsupported_query_mode_and_missing_embedding() -> None:
    store = IqdbVectorStore(device="cpu")
    with pytest.raises(iqdb.InvalidArgument, match="mmr"):
        store.query(VectorStoreQuery(query_embedding=[1.0], mode=VectorStoreQueryMode.MMR))
    with pytest.raises(iqdb.InvalidArgument, match="query_embedding"):
        store.query(VectorStoreQuery(query_embedding=None))
    with pytest.raises(iqdb.InvalidArgument, match="no embedding"):
        store.add([TextNode(id_="x", text="no vector")])
    store.close()


def test_filter_translation_is_iqdb_dict_form() -> None:
    filters = MetadataFilters(
        filters=[
            MetadataFilter(key="year", operator=FilterOperator.GTE, value=2020),
            MetadataFilters(
                filters=[ExactMatchFilter(key="kind", value="doc")], condition=FilterCondition.NOT
            ),
        ]
    )
    assert to_filter_dict(filters, "m.") == {
        "$and": [{"m.year": {"$gte": 2020}}, {"$not": {"$or": [{"m.kind": {"$eq": "doc"}}]}}]
    }


# -- end to end: VectorStoreIndex over iqdb --------------------------------------------------------
_VOCAB = ["apple", "banana", "cherry", "engine", "wheel", "brake", "ocean", "river", "rain", "bread"]


class WordEmbedding(BaseEmbedding):
    """A deterministic, local embedding: word counts over a small vocabulary, plus a hashed
    dimension so no text embeds to the zero vector."""

    def _vector(self, text: str) -> list[float]:
        words = re.findall(r"[a-z]+", text.lower())
        counts = [float(words.count(w)) for w in _VOCAB]
        counts.append(hashlib.blake2b(text.encode(), digest_size=1).digest()[0] / 2550.0 + 0.01)
        return counts

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._vector(text)

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._vector(query)

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return self._vector(query)


def _documents() -> list[Document]:
    return [
        Document(text="apple banana cherry apple", doc_id="fruit", metadata={"topic": "food", "year": 2021}),
        Document(
            text="engine wheel brake engine", doc_id="car", metadata={"topic": "vehicles", "year": 2019}
        ),
        Document(text="ocean river rain ocean", doc_id="water", metadata={"topic": "nature", "year": 2023}),
        Document(text="bread apple banana bread", doc_id="bakery", metadata={"topic": "food", "year": 2024}),
    ]


def test_vector_store_index_end_to_end_with_reopen(tmp_path: Path) -> None:
    path = str(tmp_path / "index")
    store = IqdbVectorStore(path, device="cpu")
    index = VectorStoreIndex.from_documents(
        _documents(),
        storage_context=StorageContext.from_defaults(vector_store=store),
        embed_model=WordEmbedding(),
    )
    assert len(store.client) == 4

    hits = index.as_retriever(similarity_top_k=1).retrieve("apple cherry")
    assert [h.node.ref_doc_id for h in hits] == ["fruit"]

    food_recent = MetadataFilters(
        filters=[
            ExactMatchFilter(key="topic", value="food"),
            MetadataFilter(key="year", operator=">", value=2022),
        ]
    )
    hits = index.as_retriever(similarity_top_k=3, filters=food_recent).retrieve("apple cherry")
    assert [h.node.ref_doc_id for h in hits] == ["bakery"]
    assert hits[0].score is not None and 0.0 < hits[0].score <= 1.0

    index.delete_ref_doc("fruit")
    hits = index.as_retriever(similarity_top_k=4).retrieve("apple cherry")
    assert "fruit" not in {h.node.ref_doc_id for h in hits}
    assert len(store.client) == 3
    store.close()

    reopened = IqdbVectorStore(path, device="cpu")
    again = VectorStoreIndex.from_vector_store(reopened, embed_model=WordEmbedding())
    hits = again.as_retriever(similarity_top_k=1).retrieve("ocean rain")
    assert [h.node.ref_doc_id for h in hits] == ["water"]
    assert hits[0].node.metadata == {"topic": "nature", "year": 2023}
    assert "ocean river rain" in hits[0].node.get_content()
    assert len(reopened.client) == 3
    reopened.close()


def test_empty_id_lists(store: IqdbVectorStore) -> None:
    # A query's empty node_ids/doc_ids restrict nothing (VectorStoreIndex sends node_ids=[]);
    # deleting or getting no ids touches nothing.
    assert sorted(_ids(store, None, node_ids=[], doc_ids=[])) == sorted([A, B, C])
    assert store.get_nodes([]) == []
    store.delete_nodes([])
    assert len(store.client) == 3
