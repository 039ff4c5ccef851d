"""The docs a newcomer reads: the README is a quickstart, and every place a message or a page
points to (docs/FILE.md#section) exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", ROOT / "SECURITY.md", *(ROOT / "docs").glob("*.md")])
SOURCES = sorted((ROOT / "reconciler").glob("*.py"))
IN_CODE = re.compile(r"(docs/[\w-]+\.md|SECURITY\.md)(#[\w-]+)?")
IN_PAGE = re.compile(r"\]\(([^)#\s:]+\.md)?(#[\w-]+)?\)")  # markdown links, not web addresses


def anchors(page: Path) -> set[str]:
    """GitHub's anchors for the page's headings: lower case, punctuation dropped, '-' for ' '."""
    found = set()
    for line in page.read_text("utf-8").splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            found.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return found


def references(path: Path) -> list[tuple[Path, str]]:
    """(page, anchor) for every link of a page (relative to it), or every docs page a message
    in the code names (relative to the project)."""
    text = path.read_text("utf-8")
    if path.suffix == ".md":
        return [
            ((path.parent / match[1]).resolve() if match[1] else path, (match[2] or "")[1:])
            for match in IN_PAGE.finditer(text)
        ]
    return [(ROOT / match[1], (match[2] or "")[1:]) for match in IN_CODE.finditer(text)]


@pytest.mark.parametrize("source", [*SOURCES, *PAGES], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_page_and_section_pointed_to_exists(source: Path) -> None:
    for page, anchor in references(source):
        assert page.is_file(), f"{source.name} points to {page}, which does not exist"
        if anchor:
            assert anchor in anchors(page), f"{source.name} points to {page.name}#{anchor}"


def test_messages_point_into_the_docs() -> None:
    """The plan's and apply's advice names sections that exist (checked above)."""
    pointed = {
        (page.relative_to(ROOT).as_posix(), anchor)
        for s in SOURCES
        for page, anchor in references(s)
    }
    assert ("docs/state.md", "the-ca") in pointed
    assert ("docs/git.md", "adopting-this-repository") in pointed


def test_the_readme_is_a_quickstart() -> None:
    lines = (ROOT / "README.md").read_text("utf-8").splitlines()
    assert len(lines) <= 200
    text = "\n".join(lines)
    for step in ("make reconcile", "make export", "ssl_ca_file", "make hba", "sslmode=verify-full"):
        assert step in text, step
    quickstart = text[text.index("## Quickstart") :]
    quickstart = quickstart[: quickstart.index("\n## ")]
    assert quickstart.rindex("make test") > quickstart.rindex("sslmode=verify-full")  # it ends so
    for page in ("docs/users-yaml.md", "docs/commands.md", "docs/state.md", "docs/git.md"):
        assert page in text, f"the README does not say where {page} is"
