"""The update suite's comparison table (BENCHMARKS.md, the `compare.py:update` block).

The precision and update suites share one timing engine, ``benchmarks/compare.py``; this
script runs it for the update suite only, so every suite has its ``<suite>_report.py``::

    python benchmarks/update/update_report.py [--size N] [--threads 1,2] [--markdown BENCHMARKS.md]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import compare  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(compare.main(["--suite", "update", *sys.argv[1:]]))
