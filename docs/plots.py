"""Plots of the committed benchmark tables (bench/results/*.md), made when the docs are built.

    python docs/plots.py OUTDIR        # write the PNGs by hand (needs matplotlib)

Every Markdown table in a result file with a ``system`` column and a ratio column (``x iqdb``
or ``time x iqdb``: time per query or per record relative to iqdb, above 1 = slower than iqdb)
becomes one horizontal bar chart, on a log scale, with the floor row (the hardware bound
measured in the same run) in grey. The numbers come from the tables as committed, so the plots
never disagree with them.
"""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

RATIO_COLUMNS = ("x iqdb", "time x iqdb")


def tables(text: str) -> list[tuple[str, list[str], list[list[str]]]]:
    """Each Markdown table in ``text``: (the heading above it, its header, its rows)."""
    found: list[tuple[str, list[str], list[list[str]]]] = []
    heading = ""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        if line.startswith("|") and i + 1 < len(lines) and re.match(r"^\|[-:| ]+\|$", lines[i + 1]):
            header = [c.strip() for c in line.strip("|").split("|")]
            rows = []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append([c.strip() for c in lines[i].strip("|").split("|")])
                i += 1
            found.append((heading, header, rows))
            continue
        i += 1
    return found


def _number(cell: str) -> float | None:
    try:
        return float(cell.replace(",", "").strip("*"))
    except ValueError:
        return None


def ratio_plots(path: Path) -> list[tuple[str, bytes]]:
    """(title, PNG bytes) for each table of ``path`` that has a system column and a ratio to iqdb."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: list[tuple[str, bytes]] = []
    for heading, header, rows in tables(path.read_text()):
        if not header or header[0] != "system":
            continue
        column = next((header.index(c) for c in RATIO_COLUMNS if c in header), None)
        if column is None:
            continue
        bars = [
            (row[0].strip("*"), value)
            for row in rows
            if len(row) > column and (value := _number(row[column])) is not None and value > 0
        ]
        if len(bars) < 2:
            continue
        names = [name.split(":")[0] for name, _ in bars]
        values = [value for _, value in bars]
        colours = [
            "#9e9e9e" if n.startswith("floor") else "#3f51b5" if n == "iqdb" else "#ff9800" for n in names
        ]
        fig, ax = plt.subplots(figsize=(7, 0.35 * len(bars) + 1.2), dpi=110)
        ax.barh(range(len(bars)), values, color=colours)
        ax.set_yticks(range(len(bars)), names)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xlabel(f"{header[column]} (time relative to iqdb; log scale, smaller is faster)")
        ax.set_title(heading, fontsize=9)
        for y, value in enumerate(values):
            ax.text(value, y, f" {value:g}", va="center", fontsize=7)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        plt.close(fig)
        out.append((heading, buffer.getvalue()))
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__)
        return 2
    root = Path(__file__).resolve().parent.parent
    target = Path(argv[1])
    target.mkdir(parents=True, exist_ok=True)
    for result in sorted((root / "bench" / "results").glob("*.md")):
        for n, (title, png) in enumerate(ratio_plots(result), 1):
            name = target / f"{result.stem}-{n}.png"
            name.write_bytes(png)
            print(f"{name}: {title}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
