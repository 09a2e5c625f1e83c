"""LangChain's own standard vector-store suite, unmodified, on an in-memory and a durable store
(and in memory on a GPU, where there is one: ``gpu`` cells skip with a reason otherwise).

Runs in the integrations environment (``bash ci/integrations.sh``): it needs langchain-tests and
pytest-asyncio in ``auto`` mode, which the main environment does not have.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("langchain_core", reason="needs langchain-core: pip install 'iqdb[langchain]'")
pytest.importorskip("langchain_tests", reason="needs langchain-tests: bash ci/integrations.sh")
pytest.importorskip("pytest_asyncio", reason="the suite's async tests need pytest-asyncio")

from langchain_tests.integration_tests import VectorStoreIntegrationTests

from iqdb.integrations.langchain import IqdbVectorStore


class TestInMemory(VectorStoreIntegrationTests):
    @pytest.fixture()
    def vectorstore(self) -> Iterator[IqdbVectorStore]:  # type: ignore[override]
        store = IqdbVectorStore(self.get_embeddings(), device="cpu")
        try:
            yield store
        finally:
            store.close()


class TestDurable(VectorStoreIntegrationTests):
    @pytest.fixture()
    def vectorstore(self, tmp_path: Path) -> Iterator[IqdbVectorStore]:  # type: ignore[override]
        store = IqdbVectorStore(self.get_embeddings(), str(tmp_path / "db"), device="cpu")
        try:
            yield store
        finally:
            store.close()


@pytest.mark.gpu
class TestInMemoryGpu(VectorStoreIntegrationTests):
    @pytest.fixture()
    def vectorstore(self) -> Iterator[IqdbVectorStore]:  # type: ignore[override]
        store = IqdbVectorStore(self.get_embeddings(), device="cuda")
        try:
            yield store
        finally:
            store.close()
