"""The documentation holds together: no file of the project cites a path outside the
repository (the definitions the code relies on live in docs/), and every relative link in
README.md and docs/*.md leads to a file that exists (and, with a #fragment, to a heading of
that file)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("gatesim", "tests", "benchmarks", "csrc", "docs", "examples")
SUFFIXES = {".py", ".md", ".h", ".cpp", ".cu", ".cuh", ".txt", ".toml", ".json", ".ini", ""}
TOP_FILES = ("README.md", "BENCHMARKS.md", "Makefile", "setup.py", "pyproject.toml",
             "requirements.txt", "pytest.ini")
# Citations of what lies outside the repository: a sibling folder, the machine's work
# tree, or the two background notes that used to hold the definitions.
_OUTSIDE = ("../" + "shared", "/" + "work/", "SCIENCE" + ".md", "ANCHORS" + ".md")
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def _project_files() -> list[Path]:
    files = [ROOT / f for f in TOP_FILES if (ROOT / f).exists()]
    for d in SCANNED:
        files += [p for p in sorted((ROOT / d).rglob("*"))
                  if p.is_file() and p.suffix in SUFFIXES and "__pycache__" not in p.parts]
    return files


def _doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    s = heading.strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def _anchors(md: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", md.read_text(encoding="utf-8"), flags=re.S)
    return {_slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, flags=re.M)}


def test_there_are_docs_to_check():
    names = {p.name for p in _doc_files()}
    assert {"README.md", "precision.md", "updates.md", "simulation.md", "lab.md",
            "metrics.md", "diff.md", "tracking.md", "cuda.md", "ray.md",
            "findings.md"} <= names
    assert len(_project_files()) > 100


def test_no_file_cites_a_path_outside_the_repository():
    bad = []
    for p in _project_files():
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for n, line in enumerate(text.splitlines(), 1):
            bad += [f"{p.relative_to(ROOT)}:{n}: {s}" for s in _OUTSIDE if s in line]
    assert not bad, "citations of paths outside the repository:\n" + "\n".join(bad)


@pytest.mark.parametrize("md", _doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(md):
    text = re.sub(r"```.*?```", "", md.read_text(encoding="utf-8"), flags=re.S)
    links = [t for t in _LINK.findall(text) if not re.match(r"[a-z]+:", t)]
    bad = []
    for target in links:
        path, _, fragment = target.partition("#")
        dest = (md.parent / path).resolve() if path else md
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif fragment and dest.suffix == ".md" and fragment not in _anchors(dest):
            bad.append(f"{target}: no heading #{fragment} in {dest.name}")
        elif ROOT not in dest.parents and dest != ROOT:
            bad.append(f"{target}: outside the repository")
    assert not bad, f"{md.relative_to(ROOT)}: " + "; ".join(bad)


def test_slug_follows_github():
    assert _slug("Network lab (`gatesim lab`): the second thing to run") == \
        "network-lab-gatesim-lab-the-second-thing-to-run"
    assert _slug("Metrics: what the tests found") == "metrics-what-the-tests-found"


# A citation of a section in prose or a docstring: docs/metrics.md, "Overlap" (also with
# "(" or a newline between the path and the quoted heading).
_SECTION_CITE = re.compile(r"docs/([\w\-]+\.md)[ ,(]{0,4}\s*\"([^\"]+)\"")


def _headings(md: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", md.read_text(encoding="utf-8"), flags=re.S)
    return {m.group(1).strip() for m in re.finditer(r"^#+\s+(.*)$", text, flags=re.M)}


def test_cited_sections_exist():
    cites, bad = 0, []
    for p in _project_files():
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for m in _SECTION_CITE.finditer(text):
            cites += 1
            doc = ROOT / "docs" / m.group(1)
            heading = " ".join(m.group(2).split())  # a citation may wrap across lines
            if not doc.exists() or heading not in _headings(doc):
                bad.append(f"{p.relative_to(ROOT)}: docs/{m.group(1)}, \"{heading}\"")
    assert cites > 10  # the pattern still finds the citations the code makes
    assert not bad, "citations of sections that do not exist:\n" + "\n".join(bad)


def test_section_citation_check_bites(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("# A\n\n## Overlap\n", encoding="utf-8")
    assert _headings(doc) == {"A", "Overlap"}
    m = _SECTION_CITE.search("see docs/" + 'metrics.md, "Overlap(M_update, M)".')
    assert m and m.group(2) not in _headings(ROOT / "docs" / "metrics.md")
