"""The FastAPI example service (examples/fastapi_service.py), driven through HTTP with httpx
against the ASGI app: upsert, get, delete, search with a filter, batch search, errors, many
concurrent requests, and a durable database that outlives the app."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the example service needs FastAPI (the test extra installs it)")
httpx = pytest.importorskip("httpx", reason="the example service's test needs httpx (the test extra)")

import iqdb  # noqa: E402

T = TypeVar("T")
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "fastapi_service.py"
DIM = 8


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fastapi_service_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pydantic resolves the models' annotations through it
    spec.loader.exec_module(module)
    return module


service = load_example()


@asynccontextmanager
async def client_for(app: Any) -> AsyncIterator[Any]:
    # httpx's ASGI transport sends no lifespan events: run the app's lifespan around it.
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://iqdb.test") as client:
            yield client


def run(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(make(), 120)

    return asyncio.run(bounded())


def records(n: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        payload: dict[str, Any] | None = {"kind": ["doc", "img"][i % 2], "year": 2000 + i % 30}
        if i % 7 == 0:
            payload = None
        elif i % 5 == 0:
            payload["blob"] = {"$bytes": "AAEC"}  # bytes travel as to_dict() writes them
        out.append({"id": i, "vector": rng.random(DIM).round(4).tolist(), "payload": payload})
    return out


def reference(data: list[dict[str, Any]]) -> iqdb.Iqdb:
    db = iqdb.open_in_memory(device="cpu")
    for r in data:
        db.upsert(iqdb.Record.from_dict(r))
    return db


def test_upsert_get_delete_and_search() -> None:
    data = records(200)
    query = np.full(DIM, 0.5).tolist()

    async def main() -> None:
        app = service.create_app(device="cpu")
        async with client_for(app) as client:
            r = await client.put("/records", json={"records": data[:150]})
            assert r.status_code == 200 and r.json() == {"upserted": 150, "count": 150}
            r = await client.put("/records", json={"records": data[150:]})
            assert r.json() == {"upserted": 50, "count": 200}
            assert (await client.get("/stats")).json() == {"count": 200, "dim": DIM, "device": "cpu"}

            r = await client.get("/records/5")
            assert r.status_code == 200
            assert iqdb.Record.from_dict(r.json()) == iqdb.Record.from_dict(data[5])
            assert r.json()["payload"]["blob"] == {"$bytes": "AAEC"}
            assert (await client.get("/records/100000")).status_code == 404

            with reference(data) as ref:
                r = await client.post("/search", json={"vector": query, "k": 7, "metric": "l2"})
                assert r.status_code == 200
                assert r.json()["hits"] == [h.to_dict() for h in ref.search(query, 7, "l2")]
                queries = np.random.default_rng(3).random((5, DIM)).tolist()
                r = await client.post("/search/batch", json={"vectors": queries, "k": 4})
                assert r.json()["results"] == [[h.to_dict() for h in q] for q in ref.search_batch(queries, 4)]

                assert (await client.delete("/records/5")).json() == {"deleted": True}
                assert (await client.delete("/records/5")).json() == {"deleted": False}
                ref.delete(5)
                r = await client.post("/search", json={"vector": data[5]["vector"], "k": 3, "metric": "l2"})
                assert [h["id"] for h in r.json()["hits"]] == [
                    int(h.id) for h in ref.search(data[5]["vector"], 3, "l2")
                ]
                assert 5 not in [h["id"] for h in r.json()["hits"]]

    run(main)


@pytest.mark.skipif(not hasattr(iqdb, "Filter"), reason="filters land with issue 11")
def test_search_with_a_filter() -> None:
    data = records(300, seed=1)
    query = np.full(DIM, 0.3).tolist()
    where = {"kind": "doc", "year": {"$gte": 2020}}

    async def main() -> None:
        async with client_for(service.create_app(device="cpu")) as client:
            await client.put("/records", json={"records": data})
            r = await client.post("/search", json={"vector": query, "k": 10, "metric": "l2", "filter": where})
            assert r.status_code == 200, r.text
            hits = r.json()["hits"]
            assert len(hits) == 10
            assert all(h["payload"]["kind"] == "doc" and h["payload"]["year"] >= 2020 for h in hits)
            with reference(data) as ref:
                assert hits == [h.to_dict() for h in ref.search(query, 10, "l2", filter=where)]
                # Batch: one filter per query (None: unfiltered), and one for all.
                queries = np.random.default_rng(4).random((3, DIM)).tolist()
                per_query = [where, None, {"$or": [{"kind": "img"}, {"year": 2001}]}]
                r = await client.post("/search/batch", json={"vectors": queries, "k": 5, "filter": per_query})
                assert r.status_code == 200, r.text
                want = ref.search_batch(queries, 5, filter=per_query)
                assert r.json()["results"] == [[h.to_dict() for h in q] for q in want]
                r = await client.post("/search/batch", json={"vectors": queries, "k": 5, "filter": where})
                want = ref.search_batch(queries, 5, filter=where)
                assert r.json()["results"] == [[h.to_dict() for h in q] for q in want]
            # A malformed filter is the caller's mistake, named in the answer.
            r = await client.post("/search", json={"vector": query, "k": 3, "filter": {"year": {"$near": 1}}})
            assert r.status_code == 422
            assert r.json()["detail"]["error"] == "InvalidArgument"
            assert "$near" in r.json()["detail"]["message"]

    run(main)


def test_bad_input_gets_a_422_that_names_the_problem() -> None:
    async def main() -> None:
        async with client_for(service.create_app(device="cpu")) as client:
            await client.put("/records", json={"records": records(10)})
            r = await client.post("/search", json={"vector": [1.0, 2.0], "k": 3})
            assert r.status_code == 422
            assert r.json()["detail"]["error"] == "DimensionMismatch"
            r = await client.post("/search", json={"vector": [0.5] * DIM, "k": -1})
            assert r.status_code == 422 and r.json()["detail"]["error"] == "InvalidArgument"
            r = await client.put("/records", json={"records": [{"id": -3, "vector": [1.0] * DIM}]})
            assert r.status_code == 422 and "-3" in r.json()["detail"]["message"]
            r = await client.put("/records", json={"records": [{"id": 1, "vector": []}]})
            assert r.status_code == 422 and r.json()["detail"]["error"] == "InvalidVector"
            r = await client.put("/records", json={"records": [{"id": 1, "vector": [1.0] * (DIM + 1)}]})
            assert r.status_code == 422 and r.json()["detail"]["error"] == "DimensionMismatch"
            r = await client.post("/search", json={"vector": "not a vector"})
            assert r.status_code == 422  # FastAPI's own validation
            # Nothing above changed the database.
            assert (await client.get("/stats")).json()["count"] == 10

    run(main)


def test_many_concurrent_requests() -> None:
    data = records(500, seed=2)
    queries = np.random.default_rng(5).random((40, DIM)).round(4).tolist()

    async def main() -> None:
        async with client_for(service.create_app(device="cpu")) as client:
            await client.put("/records", json={"records": data})
            with reference(data) as ref:
                want = [[h.to_dict() for h in ref.search(q, 5, "l2")] for q in queries]
            # Writers add records far from every query, so each search's answer is fixed.
            far = [{"id": 10_000 + i, "vector": [50.0 + i] * DIM, "payload": None} for i in range(20)]
            calls = [client.post("/search", json={"vector": q, "k": 5, "metric": "l2"}) for q in queries]
            calls += [client.put("/records", json={"records": [r]}) for r in far]
            answers = await asyncio.gather(*calls)
            assert all(a.status_code == 200 for a in answers)
            assert [a.json()["hits"] for a in answers[:40]] == want
            assert (await client.get("/stats")).json()["count"] == 520

    run(main)


def test_a_durable_service_keeps_its_records(tmp_path: Path) -> None:
    data = records(50)

    async def main() -> None:
        async with client_for(service.create_app(str(tmp_path / "db"), device="cpu")) as client:
            assert (await client.put("/records", json={"records": data})).status_code == 200
            assert (await client.delete("/records/3")).json() == {"deleted": True}

    run(main)
    # The app's shutdown closed (and compacted) the database.
    with iqdb.open(tmp_path / "db", device="cpu") as db:
        assert len(db) == 49 and 3 not in db
        assert db.get(4) == iqdb.Record.from_dict(data[4])
        assert db.check()["ok"]
