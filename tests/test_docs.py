"""The README's and bench/RESULTS.md's links between their sections lead somewhere."""

import re

import pytest

from conftest import REPO

DOCS = ["README.md", "bench/RESULTS.md"]
LINK = re.compile(r"\]\(([^)\s]*)\)")


def anchors(path):
    """GitHub's anchors for a Markdown file's headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", path.read_text(encoding="utf-8"), flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


@pytest.mark.parametrize("doc", DOCS)
def test_every_link_in_the_docs_leads_to_a_file_and_heading_that_exist(doc):
    source = REPO / doc
    links = LINK.findall(source.read_text(encoding="utf-8"))
    assert links, f"{doc} has no links: the pattern is wrong"
    broken = []
    for link in links:
        if link.startswith(("http://", "https://")):
            continue
        file_part, _, anchor = link.partition("#")
        target = (source.parent / file_part).resolve() if file_part else source
        if not target.is_file() or (anchor and anchor not in anchors(target)):
            broken.append(link)
    assert not broken, f"{doc} links to what is not there: {broken}"


def test_the_anchor_rule_matches_githubs_for_these_headings():
    # the README's own headings, whose anchors GitHub shows (a broken rule would pass broken links or fail good ones)
    names = anchors(REPO / "README.md")
    assert {"penn-treebank-zaremba-et-al-2014", "large-vocabularies-adaptive-softmax", "on-a-gpu",
            "bf16-on-the-cpu"} <= names
