"""The README and docs/: every relative link leads to a file of the repository, and every
#anchor to a heading of the page it names (GitHub's anchors: lower case, punctuation dropped,
spaces as hyphens)."""

from __future__ import annotations

import glob
import os
import re

import pytest

from conftest import REPO

PAGES = [os.path.join(REPO, "README.md"), *sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchor(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: str) -> set[str]:
    with open(path, encoding="utf-8") as f:
        text = re.sub(r"(?ms)^```.*?^```", "", f.read())  # a "#" line in a code block is no heading
    return {anchor(m.group(1)) for m in re.finditer(r"(?m)^#{1,6} (.*)$", text)}


def links(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        text = re.sub(r"(?ms)^```.*?^```", "", f.read())
    return [m.group(1) for m in LINK.finditer(text) if not re.match(r"^[a-z]+:", m.group(1))]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: os.path.relpath(p, REPO))
def test_every_relative_link_and_anchor_resolves(page):
    broken = []
    for target in links(page):
        file, _, fragment = target.partition("#")
        path = os.path.normpath(os.path.join(os.path.dirname(page), file)) if file else page
        if not os.path.exists(path):
            broken.append(f"{target} (no file {os.path.relpath(path, REPO)})")
        elif fragment and path.endswith(".md") and fragment not in anchors(path):
            broken.append(f"{target} (no heading #{fragment} in {os.path.relpath(path, REPO)})")
    assert not broken, f"{os.path.relpath(page, REPO)}: " + "; ".join(broken)


def test_the_readme_links_every_page_of_docs():
    linked = {os.path.normpath(os.path.join(REPO, t.partition("#")[0])) for t in links(PAGES[0])}
    assert set(PAGES[1:]) <= linked, sorted(set(PAGES[1:]) - linked)
