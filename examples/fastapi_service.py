"""A small vector search service: FastAPI over :class:`iqdb.AsyncIqdb`.

Run it (``pip install "iqdb[server]"``)::

    IQDB_PATH=./vectors uvicorn examples.fastapi_service:app     # durable, in ./vectors
    uvicorn examples.fastapi_service:app                          # in memory

then::

    curl -X PUT localhost:8000/records -H 'content-type: application/json' \\
         -d '{"records": [{"id": 1, "vector": [0.1, 0.9], "payload": {"kind": "doc", "year": 2021}}]}'
    curl -X POST localhost:8000/search -H 'content-type: application/json' \\
         -d '{"vector": [0.1, 0.8], "k": 5, "filter": {"kind": "doc", "year": {"$gte": 2020}}}'

Endpoints:

- ``PUT /records``: upsert a batch of records (``{"records": [{"id", "vector", "payload"}]}``), all
  or nothing.
- ``GET /records/{id}``, ``DELETE /records/{id}``.
- ``POST /search``: one query, ``{"vector", "k", "metric", "filter"}``; the filter is iqdb's
  dict form (``{"field": value, "year": {"$gte": 2020}, "$or": [...]}``), passed as ``filter=``.
- ``POST /search/batch``: many queries, ``{"vectors", "k", "metric", "filter"}``; one filter for
  all or a list with one per query.
- ``GET /stats``: count, dimension and device.

Records and hits travel in the form of :meth:`iqdb.Record.to_dict` /
:meth:`iqdb.SearchResult.to_dict` (bytes and non-finite floats as ``{"$bytes": ...}`` and
``{"$float": "nan"}``). Bad input gets a 422 whose ``detail`` names the iqdb error and says
what was wrong.

Every handler awaits the database, so the event loop keeps serving while searches run in
worker threads. A request cancelled by its client (a disconnect) may still complete its write;
a write is all or nothing either way.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

import iqdb
from iqdb import AsyncIqdb, Record

Filter = dict[str, Any]


class RecordIn(BaseModel):
    id: int
    vector: list[float]
    payload: dict[str, Any] | None = None


class Upsert(BaseModel):
    records: list[RecordIn] = Field(min_length=1)


class Search(BaseModel):
    vector: list[float]
    k: int = 10
    metric: str = "cosine"
    filter: Filter | None = None


class BatchSearch(BaseModel):
    vectors: list[list[float]]
    k: int = 10
    metric: str = "cosine"
    filter: Filter | list[Filter | None] | None = None


def create_app(path: str | None = None, *, device: str = "auto") -> FastAPI:
    """The service over a database in directory ``path`` (in memory when ``None``), opened when
    the app starts and closed (compacted, when durable) when it stops."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        opening = AsyncIqdb.open(path, device=device) if path else AsyncIqdb.open_in_memory(device=device)
        async with opening as db:
            app.state.db = db
            yield

    app = FastAPI(title="iqdb search", lifespan=lifespan)

    def database(request: Request) -> AsyncIqdb:
        db: AsyncIqdb = request.app.state.db
        return db

    @app.exception_handler(iqdb.IqdbError)
    async def iqdb_error(request: Request, exc: iqdb.IqdbError) -> JSONResponse:
        # The caller's mistakes (bad vector, dimension, id, filter, ...) are ValueErrors.
        status = 422 if isinstance(exc, ValueError) else 503 if isinstance(exc, iqdb.Closed) else 500
        return JSONResponse({"detail": {"error": type(exc).__name__, "message": str(exc)}}, status)

    @app.put("/records")
    async def upsert(body: Upsert, request: Request) -> dict[str, int]:
        records = [Record.from_dict(r.model_dump()) for r in body.records]
        vectors = [r.vector.to_numpy() for r in records]
        if len({v.shape for v in vectors}) > 1:
            raise HTTPException(422, "the records' vectors differ in dimension")
        db = database(request)
        await db.upsert_many([r.id for r in records], np.stack(vectors), [r.payload for r in records])
        return {"upserted": len(records), "count": len(db)}

    @app.get("/records/{rid}")
    async def get(rid: int, request: Request) -> dict[str, Any]:
        record = await database(request).get(rid)
        if record is None:
            raise HTTPException(404, f"no record with id {rid}")
        return record.to_dict()

    @app.delete("/records/{rid}")
    async def delete(rid: int, request: Request) -> dict[str, bool]:
        return {"deleted": await database(request).delete(rid)}

    @app.post("/search")
    async def search(body: Search, request: Request) -> dict[str, Any]:
        hits = await database(request).search(body.vector, body.k, body.metric, filter=body.filter)
        return {"hits": [h.to_dict() for h in hits]}

    @app.post("/search/batch")
    async def search_batch(body: BatchSearch, request: Request) -> dict[str, Any]:
        db = database(request)
        results = await db.search_batch(body.vectors, body.k, body.metric, filter=body.filter)
        return {"results": [[h.to_dict() for h in hits] for hits in results]}

    @app.get("/stats")
    async def stats(request: Request) -> dict[str, Any]:
        db = database(request)
        return {"count": len(db), "dim": db.dim, "device": db.device}

    return app


# For `uvicorn examples.fastapi_service:app`; IQDB_DEVICE (read by iqdb) picks the device.
app = create_app(os.environ.get("IQDB_PATH") or None)
