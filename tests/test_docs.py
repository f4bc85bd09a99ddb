"""The README is one page for a new operator; the reference is the docs site under docs/.

`make docs` builds the site with `mkdocs build --strict` (broken links and anchors, a page left
out of the nav); these tests check what mkdocs does not see: the README's own links, its length,
and that the documents name the variables config/.env.example really has."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
ENV_EXAMPLE = ROOT / "config" / ".env.example"

LINK = re.compile(r"\]\(([^)\s]+)\)")
PLACEHOLDERS = {"NAME", "X"}  # the docs' own "${NAME}" in prose about the syntax


def prose(document: Path) -> str:
    """The text outside code blocks and code spans (where `[x](y)` is an example, not a link)."""
    text = re.sub(r"^```.*?^```", "", document.read_text(encoding="utf-8"), flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def documents() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def slug(heading: str) -> str:
    """The anchor mkdocs' toc extension gives a heading (and GitHub, for these headings)."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    text = re.sub(r"[^\w\s-]", "", text)
    return re.sub(r"[\s]+", "-", text).strip("-")


def anchors(document: Path) -> set[str]:
    found = set()
    fenced = False
    for line in document.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            found.add(slug(line.lstrip("#")))
    return found


def test_the_readme_is_one_page() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) < 450
    headings = [line for line in lines if line.startswith("## ")]
    # the quick start first, then what a new operator needs on day one
    assert headings[:3] == ["## Quick start", "## Before you start", "## Install and first run"]
    quick = README.read_text(encoding="utf-8").split("## Quick start", 1)[1]
    commands = re.findall(r"^make (\w+)", quick, re.M)
    assert commands[:2] == ["demo", "test"]


def test_every_relative_link_in_the_readme_and_the_docs_resolves() -> None:
    checked = 0
    for document in documents():
        for target in LINK.findall(prose(document)):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
                continue
            path, _, anchor = target.partition("#")
            resolved = (document.parent / path) if path else document
            assert resolved.exists(), f"{document.name} links to {target}, which is missing"
            if anchor and resolved.suffix == ".md":
                assert anchor in anchors(resolved), f"{document.name}: no #{anchor} in {path}"
            checked += 1
    assert checked > 20


def test_every_docs_page_is_in_the_site_navigation() -> None:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))

    def pages(nav: object) -> set[str]:
        if isinstance(nav, str):
            return {nav}
        if isinstance(nav, list):
            return set().union(*(pages(item) for item in nav))
        if isinstance(nav, dict):
            return set().union(*(pages(item) for item in nav.values()))
        return set()

    assert pages(config["nav"]) == {p.name for p in DOCS.glob("*.md")}
    assert config["strict"] is True


def test_the_documents_name_the_variables_the_env_example_has() -> None:
    defined = {
        line.lstrip("# ").partition("=")[0]
        for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines()
        if "=" in line
    }
    for document in documents():
        used = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)\}", document.read_text(encoding="utf-8")))
        missing = used - PLACEHOLDERS - defined
        assert not missing, f"{document.name} uses {sorted(missing)}, not in config/.env.example"


def test_the_documents_speak_to_operators_not_about_the_projects_internals() -> None:
    for document in documents():
        text = document.read_text(encoding="utf-8")
        assert not re.search(r"\bSPEC\b", text), f"{document.name} mentions the SPEC"
