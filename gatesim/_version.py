"""The package version, in one place: pyproject.toml reads it (``dynamic = ["version"]``)
and ``gatesim.__version__`` re-exports it. No imports: reading it loads nothing else."""
__version__ = "0.1.0"
