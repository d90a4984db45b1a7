"""One marked block of a Markdown file (BENCHMARKS.md), shared by the report scripts."""
from __future__ import annotations

from pathlib import Path


def replace_marked(path: Path, begin: str, end: str, body: str) -> None:
    """Replaces the text between ``begin`` and ``end`` in ``path`` with ``body``; appends
    the marked block if the markers are absent, or writes it alone to a new file."""
    block = f"{begin}\n{body}{end}\n"
    text = path.read_text() if path.exists() else ""
    start, stop = text.find(begin), text.find(end)
    if start >= 0 and stop > start:
        text = text[:start] + block + text[stop + len(end):].lstrip("\n")
    elif text:
        text = text.rstrip("\n") + "\n\n" + block
    else:
        text = block
    path.write_text(text)
