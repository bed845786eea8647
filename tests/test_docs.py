"""The repository's documentation stands on its own: code and docs cite the original through docs/original.md anchors
(never the steering documents the project was planned with, which a user of the repository does not have), every
such anchor exists, and every public class says what it is."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ORIGINAL = REPO / "docs" / "original.md"
PACKAGE = REPO / "af2_jax"
# Where users read: the package and the documentation and recipes shipped beside it.
DOC_ROOTS = ("docs", "README.md", "train", "infer", "convert", "eval")
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".sh", ".toml", ".txt"}

# Section numbers and quirk numbers of the steering spec (AF2_SPEC 3.2, Q8), which nothing in the repository resolves.
SPEC_CITATION = re.compile(r"AF2_SPEC|\bQ[0-9]+\b")
STEERING_PATH = re.compile(r"shared/docs|AF2_SPEC\.md")
LINK = re.compile(r"original\.md#([\w-]+)")
SAME_FILE_LINK = re.compile(r"\]\(#([\w-]+)\)")
EXPLICIT_ANCHOR = re.compile(r"<a\s+(?:id|name)=\"([^\"]+)\"")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*$", re.MULTILINE)


def _text_files(*roots: str) -> list[Path]:
    files = []
    for root in roots:
        path = REPO / root
        candidates = [path] if path.is_file() else sorted(path.rglob("*"))
        files += [p for p in candidates if p.is_file() and p.suffix in TEXT_SUFFIXES]
    return files


def _hits(pattern: re.Pattern, files: list[Path]) -> list[str]:
    return [f"{path.relative_to(REPO)}:{number}: {line.strip()}"
            for path in files for number, line in enumerate(path.read_text().splitlines(), 1)
            if pattern.search(line)]


def _github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors() -> list[str]:
    text = ORIGINAL.read_text()
    return EXPLICIT_ANCHOR.findall(text) + [_github_slug(h) for h in HEADING.findall(text)]


def test_package_cites_no_steering_document():
    hits = _hits(SPEC_CITATION, sorted(PACKAGE.rglob("*.py")))
    assert not hits, ("comments cite the steering spec, which the repository does not ship; cite "
                      "docs/original.md#ANCHOR instead:\n" + "\n".join(hits))


def test_docs_and_recipes_cite_no_steering_document():
    files = _text_files(*DOC_ROOTS)
    hits = _hits(SPEC_CITATION, files) + _hits(STEERING_PATH, files + sorted(PACKAGE.rglob("*.py")))
    assert not hits, ("documentation cites the steering documents, which the repository does not ship; cite "
                      "docs/original.md#ANCHOR instead:\n" + "\n".join(hits))


def test_anchors_of_original_md_are_unique():
    anchors = _anchors()
    repeated = sorted({a for a in anchors if anchors.count(a) > 1})
    assert not repeated, f"docs/original.md defines these anchors more than once: {repeated}"


def test_every_link_into_original_md_names_an_existing_anchor():
    anchors = set(_anchors())
    links = [(path, anchor) for path in sorted(PACKAGE.rglob("*.py")) + _text_files(*DOC_ROOTS)
             for anchor in LINK.findall(path.read_text())]
    links += [(ORIGINAL, anchor) for anchor in SAME_FILE_LINK.findall(ORIGINAL.read_text())]
    # The package's comments are the main users of these anchors: none found means the pattern no longer matches.
    assert any(path.is_relative_to(PACKAGE) for path, _ in links), "no link into docs/original.md found in af2_jax/"
    broken = sorted({f"{path.relative_to(REPO)}: #{anchor}" for path, anchor in links if anchor not in anchors})
    assert not broken, ("links into docs/original.md name anchors it does not define; add the anchor there or fix "
                        "the link:\n" + "\n".join(broken))


def test_every_public_class_has_a_docstring():
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_") and not ast.get_docstring(node):
                missing.append(f"{path.relative_to(REPO)}:{node.lineno}: class {node.name}")
    assert not missing, ("public classes without a docstring (say what it is and, for modules, the shapes and "
                         "dtypes in and out):\n" + "\n".join(missing))
