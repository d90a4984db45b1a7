"""The precision suite's comparison table (BENCHMARKS.md, the `compare.py:precision` block).

The precision and update suites share one timing engine, ``benchmarks/compare.py``; this
script runs it for the precision suite only, so every suite has its ``<suite>_report.py``::

    python benchmarks/precision/precision_report.py [--size N] [--threads 1,2] [--markdown BENCHMARKS.md]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import compare  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(compare.main(["--suite", "precision", *sys.argv[1:]]))
