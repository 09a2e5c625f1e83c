"""A griffe extension for the API reference: doctest examples in docstrings become code blocks.

iqdb's docstrings open with runnable examples (``>>> ...`` lines and their output), which
doctest checks but Markdown would read as block quotes. This wraps each such block, up to the
next blank line, in a ``pycon`` fence before mkdocstrings renders the docstring.
"""

from __future__ import annotations

from typing import Any

import griffe


def fence_doctests(text: str) -> str:
    """``text`` with every doctest block (a ``>>>`` line up to the next blank line) fenced."""
    out: list[str] = []
    block: list[str] = []
    indent = ""
    in_fence = False
    for line in [*text.splitlines(), ""]:
        stripped = line.lstrip()
        if block:
            if stripped:
                block.append(line[len(indent) :] if line.startswith(indent) else stripped)
                continue
            out += [f"{indent}```pycon", *(f"{indent}{b}" for b in block), f"{indent}```"]
            block = []
        if stripped.startswith("```"):
            in_fence = not in_fence
        if not in_fence and stripped.startswith(">>>"):
            indent = line[: len(line) - len(stripped)]
            block = [stripped]
            continue
        out.append(line)
    return "\n".join(out[:-1])


class DoctestFences(griffe.Extension):
    """Fence the doctest blocks of every object's docstring."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = fence_doctests(obj.docstring.value)
