"""Jobs that run on a Ray cluster and the `minit2i` command (see docs/ARCHITECTURE.md)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]      # the checkout (or site-packages): jobs/configs/ is under it


def repo_path(path: str) -> str:
    """`path` as given when it exists or is absolute, else relative to the checkout, so a config
    named `jobs/configs/debug.yaml` is found from any working directory."""
    p = Path(path)
    return str(p if p.is_absolute() or p.exists() else ROOT / p)
