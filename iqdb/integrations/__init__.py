"""Adapters that let LangChain and LlamaIndex use iqdb as their vector store.

>>> from iqdb.integrations.langchain import IqdbVectorStore  # doctest: +SKIP
>>> from iqdb.integrations.llama_index import IqdbVectorStore  # doctest: +SKIP

One module per framework, each importing its framework only when it is itself imported:
``import iqdb`` and ``import iqdb.integrations`` import neither. Install the framework with the
matching extra: ``pip install "iqdb[langchain]"`` or ``pip install "iqdb[llama-index]"``.
"""

from ._common import IdCollision

__all__ = ["IdCollision"]
