"""mkdocs hooks (mkdocs.yml ``hooks:``): pages that stay in step with the code and the results.

In a page's Markdown:

- ``<!-- bench: NAME.md -->`` becomes the committed result file ``bench/results/NAME.md`` (its
  headings moved down two levels), followed by one plot per table of ratios (see plots.py), and
  the committed PNGs of the same name;
- ``<!-- iqdb-help: COMMAND -->`` becomes the output of ``iqdb COMMAND --help`` (empty COMMAND:
  ``iqdb --help``), run at build time.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plots import ratio_plots

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
_BENCH = re.compile(r"<!-- bench: ([\w.-]+\.md) -->")
_HELP = re.compile(r"<!-- iqdb-help: ?([\w-]*) -->")
_plots: dict[str, list[tuple[str, str]]] = {}  # result file -> [(title, site path)]


def on_files(files: Files, config: Any) -> Files:
    """Add the plots made from the result tables, and the committed PNGs, to the site."""
    _plots.clear()
    for result in sorted(RESULTS.glob("*.md")):
        made = _plots.setdefault(result.name, [])
        for n, (title, png) in enumerate(ratio_plots(result), 1):
            uri = f"plots/{result.stem}-{n}.png"
            files.append(File.generated(config, uri, content=png))
            made.append((title, uri))
    for committed in sorted(RESULTS.glob("*.png")):  # linked from their result files
        files.append(File.generated(config, f"plots/{committed.name}", abs_src_path=str(committed)))
    return files


def _bench(match: re.Match[str], depth: int) -> str:
    name = match.group(1)
    path = RESULTS / name
    if not path.exists():
        raise FileNotFoundError(f"docs: no result file bench/results/{name}")
    text = re.sub(r"^(#+)", lambda h: "#" * min(6, len(h.group(1)) + 2), path.read_text(), flags=re.M)
    up = "../" * depth
    # The result files link their committed PNGs as siblings; on the site they are in plots/.
    text = re.sub(r"\]\(([\w.-]+\.png)\)", lambda m: f"]({up}plots/{m.group(1)})", text)
    # Each plot goes right after its table: the first table below the heading it is named for.
    pending = {title: f"![{title}]({up}{uri})" for title, uri in _plots.get(name, [])}
    out: list[str] = []
    waiting: str | None = None
    in_table = False
    for line in [*text.splitlines(), ""]:
        if in_table and not line.startswith("|") and waiting is not None:
            out += ["", pending.pop(waiting)]
            waiting = None
        in_table = line.startswith("|")
        if line.startswith("#") and line.lstrip("#").strip() in pending:
            waiting = line.lstrip("#").strip()
        out.append(line)
    if pending:
        raise ValueError(f"docs: no table found for the plots {sorted(pending)} of {name}")
    return "\n".join(out)


def _help(match: re.Match[str]) -> str:
    command = [c for c in [match.group(1)] if c]
    done = subprocess.run(
        [sys.executable, "-m", "iqdb", *command, "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        env={**os.environ, "COLUMNS": "100", "NO_COLOR": "1", "TERM": "dumb"},
    )
    return f"```text\n$ iqdb {' '.join([*command, '--help'])}\n{done.stdout.rstrip()}\n```"


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    """Fill in the markers described in the module docstring."""
    depth = page.file.src_uri.count("/")  # links in Markdown are relative to the source file
    markdown = _BENCH.sub(lambda m: _bench(m, depth), markdown)
    return _HELP.sub(_help, markdown)
