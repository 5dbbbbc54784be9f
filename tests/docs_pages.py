"""The user documentation the tests read: README.md (short: what it is, the two commands, the tour)
and one page per topic under docs/. Plain functions, no heavy imports."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DOCS = REPO / "docs"


def doc_files() -> list[Path]:
    """README.md first, then every docs/*.md page in name order."""
    return [README, *sorted(DOCS.glob("*.md"))]


def doc_text() -> str:
    """README.md and every docs page, one after the other: for claims that may live on any page."""
    return "\n".join(path.read_text() for path in doc_files())
