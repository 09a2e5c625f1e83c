"""The LangChain adapter's own behaviour: ids, payload layout, scores, MMR, filters, reopen, device.

LangChain's standard suite runs in ``test_langchain_standard.py``; these cover what it does not.
"""

from __future__ import annotations

import importlib.util
import math
import uuid
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("langchain_core", reason="needs langchain-core: pip install 'iqdb[langchain]'")

from langchain_core.documents import Document
from langchain_core.embeddings import DeterministicFakeEmbedding, Embeddings

import iqdb
from iqdb.integrations import IdCollision
from iqdb.integrations import langchain as lc
from iqdb.integrations._common import relevance_fn, string_id
from iqdb.integrations.langchain import IqdbVectorStore


class TableEmbeddings(Embeddings):
    """Texts embed to the vectors given in a table (queries too): exact, local, deterministic."""

    def __init__(self, table: dict[str, list[float]]) -> None:
        self.table = table

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return [self.table[t] for t in texts]

    def embed_query(self, text: str) -> list[float]:
        return self.table[text]


TABLE = {
    "north": [0.0, 1.0],
    "north2": [0.01, 1.0],  # nearly a duplicate of "north"
    "east": [1.0, 0.0],
    "northeast": [1.0, 1.0],
    "south": [0.0, -1.0],
    "q": [-0.05, 1.0],
}


@pytest.fixture(params=["memory", "durable"])
def path(request: pytest.FixtureRequest, tmp_path: Path) -> str | None:
    return None if request.param == "memory" else str(tmp_path / "db")


def _store(path: str | None = None, metric: str = "cosine") -> IqdbVectorStore:
    return IqdbVectorStore(TableEmbeddings(TABLE), path, metric=metric, device="cpu")


# -- ids ------------------------------------------------------------------------------------
def test_ids_are_returned_as_given_and_map_to_a_63_bit_hash(path: str | None) -> None:
    with _store(path) as store:
        assert store.add_texts(["north", "east"], ids=["1", "foo"]) == ["1", "foo"]
        for key in ("1", "foo"):
            rid = string_id(key)
            assert 0 <= rid < 2**63
            record = store.client.get(rid)
            assert record is not None and record.payload is not None
            assert record.payload["key"] == key
        assert string_id("foo") == string_id("foo") != string_id("foo ")


def test_missing_ids_are_uuid4_strings() -> None:
    with _store() as store:
        ids = store.add_texts(["north", "east"])
        assert [uuid.UUID(i).version for i in ids] == [4, 4]
        assert len(set(ids)) == 2
        assert sorted(d.id for d in store.get_by_ids(ids)) == sorted(ids)


def test_ids_argument_wins_over_document_id_and_documents_are_not_changed() -> None:
    with _store() as store:
        doc = Document(page_content="north", metadata={"a": 1}, id="inside")
        assert store.add_documents([doc], ids=["outside"]) == ["outside"]
        assert doc.id == "inside" and doc.metadata == {"a": 1}
        assert store.get_by_ids(["inside"]) == []
        assert [d.id for d in store.get_by_ids(["outside"])] == ["outside"]


def test_a_collision_with_a_stored_id_is_an_error_not_an_overwrite() -> None:
    with _store() as store:
        # What a 63-bit hash collision leaves behind: another string id at foo's integer id.
        rid = string_id("foo")
        store.client.upsert(iqdb.Record(rid, [0.0, 1.0], {"key": "bar", "text": "bar's", "metadata": {}}))
        with pytest.raises(IdCollision, match="'foo'") as info:
            store.add_texts(["east"], ids=["foo"])
        assert isinstance(info.value, iqdb.IqdbError) and info.value.rid == rid
        with pytest.raises(IdCollision):
            store.get_by_ids(["foo"])
        assert store.delete(["foo"]) is False  # foo is not stored; bar's record stays
        record = store.client.get(rid)
        assert record is not None and record.payload == {"key": "bar", "text": "bar's", "metadata": {}}


def test_a_collision_within_one_batch_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lc, "string_id", lambda key: 7)
    with _store() as store:
        with pytest.raises(IdCollision, match="'b'"):
            store.add_texts(["north", "east"], ids=["a", "b"])
        assert len(store.client) == 0


def test_ids_that_are_not_utf8_strings_are_typed_errors() -> None:
    # (LangChain's Document itself turns a number into a string before the adapter sees it.)
    with pytest.raises(iqdb.InvalidArgument, match="int"):
        string_id(1)
    with _store() as store, pytest.raises(iqdb.InvalidArgument, match="UTF-8"):
        store.add_texts(["north"], ids=["bad\ud800"])


# -- payload layout -------------------------------------------------------------------------
def test_reserved_keys_never_leak_and_user_keys_named_like_them_round_trip(path: str | None) -> None:
    metadata = {"id": 5, "key": "mine", "text": "also mine", "metadata": {"nested": [1, 2]}, "_id": None}
    with _store(path) as store:
        store.add_texts(["north"], [metadata], ids=["doc"])
        [got] = store.get_by_ids(["doc"])
        assert (got.id, got.page_content, got.metadata) == ("doc", "north", metadata)
        [hit] = store.similarity_search("q", k=1)
        assert hit.metadata == metadata and hit.id == "doc"
        # and a filter on the user's own "id" key
        assert [d.id for d in store.similarity_search("q", k=3, filter={"id": 5})] == ["doc"]
        assert store.similarity_search("q", k=3, filter={"id": "doc"}) == []


def test_re_adding_an_id_replaces_text_metadata_and_vector() -> None:
    with _store() as store:
        store.add_texts(["north"], [{"v": 1}], ids=["x"])
        store.add_texts(["south"], [{"v": 2}], ids=["x"])
        assert len(store.client) == 1
        [doc] = store.get_by_ids(["x"])
        assert (doc.page_content, doc.metadata) == ("south", {"v": 2})
        [(hit, dist)] = store.similarity_search_with_score("north", k=1)
        assert hit.id == "x" and dist == pytest.approx(2.0)  # cosine distance to the opposite


def test_bad_metadata_names_its_key() -> None:
    with _store() as store, pytest.raises(iqdb.InvalidArgument, match="when"):
        store.add_texts(["north"], [{"when": object()}])


# -- scores ---------------------------------------------------------------------------------
@pytest.mark.parametrize("metric", ["cosine", "l2", "dot"])
def test_relevance_scores_are_in_0_1_and_higher_is_closer(metric: str) -> None:
    with _store(metric=metric) as store:
        store.add_texts(["north", "east", "northeast", "south"], ids=["n", "e", "ne", "s"])
        scored = store.similarity_search_with_relevance_scores("q", k=4)
        assert next(d.id for d, _ in scored) == "n"
        scores = [s for _, s in scored]
        assert all(0.0 <= s <= 1.0 for s in scores)
        assert scores == sorted(scores, reverse=True)
        assert scores[0] > scores[-1]
        distances = [dist for _, dist in store.similarity_search_with_score("q", k=4)]
        fn = relevance_fn(iqdb.DistanceMetric(metric))
        assert scores == [fn(d) for d in distances]


def test_relevance_functions_at_their_ends() -> None:
    cos, l2, dot = (relevance_fn(iqdb.DistanceMetric(m)) for m in ("cosine", "l2", "dot"))
    assert (cos(0.0), cos(1.0), cos(2.0), cos(float("nan"))) == (1.0, 0.5, 0.0, 0.0)
    assert (l2(0.0), l2(1.0), l2(math.inf)) == (1.0, 0.5, 0.0)
    assert dot(0.0) == 0.5 and dot(-1e6) == 1.0 and dot(1e6) == 0.0
    assert dot(-2.0) > dot(-1.0) > dot(1.0)


def test_score_threshold_uses_iqdb_relevance() -> None:
    with _store(metric="l2") as store:
        store.add_texts(["north", "south"], ids=["n", "s"])
        # l2 distance q-north 0.05 -> ~0.95; q-south ~2.0 -> ~0.33
        kept = store.similarity_search_with_relevance_scores("q", k=2, score_threshold=0.5)
        assert [d.id for d, _ in kept] == ["n"]


# -- MMR ------------------------------------------------------------------------------------
def test_mmr_prefers_diversity_over_a_near_duplicate(path: str | None) -> None:
    with _store(path) as store:
        store.add_texts(["north", "north2", "east", "south"], ids=["n", "n2", "e", "s"])
        plain = [d.id for d in store.similarity_search("q", k=2)]
        assert plain == ["n", "n2"]
        diverse = [d.id for d in store.max_marginal_relevance_search("q", k=2, fetch_k=4, lambda_mult=0.3)]
        assert diverse[0] == "n" and diverse[1] != "n2"
        relevant = [d.id for d in store.max_marginal_relevance_search("q", k=2, fetch_k=4, lambda_mult=1.0)]
        assert relevant == ["n", "n2"]
        assert store.max_marginal_relevance_search("q", k=2, filter={"none": 1}) == []


def test_mmr_honours_filters() -> None:
    with _store() as store:
        store.add_texts(["north", "north2", "east"], [{"g": 1}, {"g": 2}, {"g": 2}], ids=["n", "n2", "e"])
        got = store.max_marginal_relevance_search("q", k=2, fetch_k=3, filter={"g": 2})
        assert sorted(d.id for d in got) == ["e", "n2"]


# -- filters and deletes --------------------------------------------------------------------
def test_filters_take_mongo_dicts_with_nested_paths() -> None:
    with _store() as store:
        store.add_texts(
            ["north", "east", "northeast", "south"],
            [
                {"year": 2020, "kind": "doc", "tags": ["a"], "src": {"site": "x"}},
                {"year": 2022, "kind": "note", "tags": ["a", "b"], "src": {"site": "y"}},
                {"year": 2024, "kind": "doc", "tags": ["b"]},
                {"kind": "doc"},
            ],
            ids=["n", "e", "ne", "s"],
        )

        def ids(flt: Any) -> list[str]:
            return sorted(str(d.id) for d in store.similarity_search("q", k=10, filter=flt))

        assert ids({"kind": "doc"}) == ["n", "ne", "s"]
        assert ids({"year": {"$gte": 2022}}) == ["e", "ne"]
        assert ids({"year": {"$ne": 2020}}) == ["e", "ne"]  # a missing year is not "!= 2020"
        assert ids({"$not": {"year": {"$eq": 2020}}}) == ["e", "ne", "s"]  # plain negation
        assert ids({"$or": [{"kind": "note"}, {"year": {"$lt": 2021}}]}) == ["e", "n"]
        assert ids({"$and": [{"kind": "doc"}, {"year": {"$exists": True}}]}) == ["n", "ne"]
        assert ids({"tags": {"$contains": "b"}}) == ["e", "ne"]
        assert ids({"year": {"$in": [2020, 2024]}}) == ["n", "ne"]
        assert ids({"src.site": "y"}) == ["e"]
        assert ids({"year": "2020"}) == []  # across types: false
        assert ids({}) == ["e", "n", "ne", "s"]


def test_filters_take_iqdb_filter_values() -> None:
    field = iqdb.Field
    with _store() as store:
        store.add_texts(["north", "east"], [{"year": 2020}, {"year": 2024}], ids=["n", "e"])
        got = store.similarity_search("q", k=5, filter=field("year") > 2021)
        assert [d.id for d in got] == ["e"]
        got = store.similarity_search("q", k=5, filter=(field("year") == 2020) | ~field("year").exists())
        assert [d.id for d in got] == ["n"]
        assert store.delete(filter=field("year").between(2023, 2025)) is True
        assert [d.id for d in store.get_by_ids(["n", "e"])] == ["n"]


def test_malformed_filters_are_typed_errors() -> None:
    with _store() as store:
        store.add_texts(["north"], ids=["n"])
        with pytest.raises(iqdb.InvalidArgument):
            store.similarity_search("q", filter={"$or": {"kind": "doc"}})
        with pytest.raises(iqdb.InvalidArgument):
            store.similarity_search("q", filter=["kind"])
        with pytest.raises(iqdb.InvalidArgument):
            store.similarity_search("q", filter={"year": {"$near": 3}})


def test_delete_by_ids_by_filter_and_never_by_accident() -> None:
    with _store() as store:
        store.add_texts(["north", "east", "south"], [{"g": 1}, {"g": 2}, {"g": 2}], ids=["n", "e", "s"])
        assert store.delete(["missing"]) is False
        assert store.delete(["n", "missing"]) is True
        assert store.delete(filter={"g": 2}) is True
        assert len(store.client) == 0
        with pytest.raises(iqdb.InvalidArgument, match="filter"):
            store.delete()


def test_unknown_keyword_arguments_are_errors() -> None:
    with _store() as store:
        with pytest.raises(iqdb.InvalidArgument, match="frobnicate"):
            store.similarity_search("q", frobnicate=True)
        with pytest.raises(iqdb.InvalidArgument, match="frobnicate"):
            store.add_texts(["north"], frobnicate=True)


# -- durability and device --------------------------------------------------------------------
def test_durable_store_reopens_with_its_documents(tmp_path: Path) -> None:
    where = str(tmp_path / "db")
    store = IqdbVectorStore.from_texts(
        ["north", "east"],
        TableEmbeddings(TABLE),
        [{"k": 1}, {"k": 2}],
        ids=["n", "e"],
        path=where,
        device="cpu",
    )
    store.delete(["e"])
    store.close()
    with _store(where) as again:
        assert len(again.client) == 1
        [doc] = again.get_by_ids(["n"])
        assert (doc.page_content, doc.metadata) == ("north", {"k": 1})
        assert [d.id for d in again.similarity_search("q", k=5)] == ["n"]
        again.add_texts(["south"], ids=["s"])
    with _store(where) as third:
        assert sorted(d.id for d in third.get_by_ids(["n", "e", "s"])) == ["n", "s"]


def test_device_passes_through() -> None:
    with IqdbVectorStore(DeterministicFakeEmbedding(size=4), device="cpu") as store:
        assert store.client.device == "cpu"
    gpu_missing = "cupy" not in {m.split(".")[0] for m in __import__("sys").modules} and not _has_gpu()
    if gpu_missing:
        with pytest.raises(iqdb.DeviceUnavailable):
            IqdbVectorStore(DeterministicFakeEmbedding(size=4), device="gpu")


def _has_gpu() -> bool:
    try:
        with iqdb.open_in_memory(device="gpu"):
            return True
    except iqdb.DeviceUnavailable:
        return False


def test_unknown_metric_is_a_typed_error() -> None:
    with pytest.raises(iqdb.InvalidArgument, match="manhattan"):
        IqdbVectorStore(DeterministicFakeEmbedding(size=4), metric="manhattan")


# -- async ----------------------------------------------------------------------------------
@pytest.mark.skipif(
    importlib.util.find_spec("pytest_asyncio") is None,
    reason="needs pytest-asyncio (bash ci/integrations.sh)",
)
async def test_async_variants(tmp_path: Path) -> None:
    store = await IqdbVectorStore.afrom_texts(
        ["north", "east", "north2"],
        TableEmbeddings(TABLE),
        ids=["n", "e", "n2"],
        path=str(tmp_path / "db"),
        device="cpu",
    )
    try:
        assert [d.id for d in await store.asimilarity_search("q", k=1)] == ["n"]
        scored = await store.asimilarity_search_with_relevance_scores("q", k=3)
        assert all(0.0 <= s <= 1.0 for _, s in scored)
        mmr = await store.amax_marginal_relevance_search("q", k=2, fetch_k=3, lambda_mult=0.1)
        assert [d.id for d in mmr] == ["n", "e"]
        assert await store.aadd_documents([Document(page_content="south", id="s")]) == ["s"]
        await store.adelete(["n"])
        assert sorted(d.id for d in await store.aget_by_ids(["n", "e", "s"])) == ["e", "s"]
    finally:
        store.close()


@pytest.mark.gpu
def test_gpu_store_answers_as_the_cpu_store(tmp_path: Path) -> None:
    texts = ["north", "north2", "east", "northeast", "south"]
    metas = [{"g": i % 2} for i in range(len(texts))]
    answers = []
    for device in ("cpu", "cuda"):
        with IqdbVectorStore(TableEmbeddings(TABLE), str(tmp_path / device), device=device) as store:
            assert store.client.device.startswith(device)
            store.add_texts(texts, metas, ids=texts)
            answers.append(
                (
                    store.similarity_search_with_score("q", k=5),
                    store.similarity_search("q", k=5, filter={"g": 1}),
                    store.max_marginal_relevance_search("q", k=3, fetch_k=5),
                )
            )
    assert answers[0] == answers[1]
