"""Pieces shared by the report scripts: one marked block of a Markdown file
(BENCHMARKS.md) and the machine line every table is headed with."""
from __future__ import annotations

import os
import platform
from pathlib import Path


def machine() -> str:
    """``"<cores>-core <CPU model> (<arch>)"`` from /proc/cpuinfo where there is one."""
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{os.cpu_count()}-core {model} ({platform.machine()})"


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
