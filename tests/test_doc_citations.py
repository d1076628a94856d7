"""Comments cite this repository's docs, and the sections they cite exist.

A citation ``docs/<page>.md#<section>`` must name an existing page and one of its headings (GitHub's anchor of
the heading). Citations of things a reader of the repository cannot open (the design brief, the reference
folder it came with, issue numbers) must not spread: the ones left are listed and may only go away.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).parent.parent
DOCS = ROOT / "docs"
CITATION = re.compile(r"docs/([A-Za-z_]+\.md)#([\w\-]+)")
UNREADABLE = re.compile(r"spec §|DESIGN §|issue [0-9]|shared/reference|shared/")

# Left in files other work is rewriting; each entry may only shrink (docs/ARCHITECTURE.md and docs/BUNDLE.md
# and docs/PRECISION.md hold the facts they point at).
KNOWN_UNREADABLE = Counter(
    {
        "src/facemoe/model/config.py": 2,
        "src/facemoe/model/moe.py": 2,
        "src/facemoe/model/swin.py": 2,
        "src/facemoe/runtime/backends/torch_backend.py": 1,
        "src/facemoe/kernels/sparse_moe_triton.py": 1,
        "src/facemoe/export/tensorrt.py": 1,
        "src/facemoe/bundle.py": 1,
    }
)


def anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {anchor(m.group(1)) for m in re.finditer(r"^#+ (.+)$", page.read_text(), re.M)}


def sources() -> list[Path]:
    files = [ROOT / "README.md", *DOCS.glob("*.md")]
    for folder in ("src", "tests", "benchmarks", "scripts"):
        files += [p for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".md", ".sh")]
    return [p for p in files if p.is_file()]


def test_anchor_follows_github() -> None:
    assert anchor("TensorRT 10.x and 11.x") == "tensorrt-10x-and-11x"
    assert anchor("INT8: explicit Q/DQ calibrated on low-resolution faces") == (
        "int8-explicit-qdq-calibrated-on-low-resolution-faces"
    )


def test_cited_doc_sections_exist() -> None:
    pages: dict[str, set[str]] = {p.name: anchors(p) for p in DOCS.glob("*.md")}
    cited = 0
    broken = []
    for path in sources():
        for line_no, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for page, section in CITATION.findall(line):
                cited += 1
                if section not in pages.get(page, set()):
                    broken.append(f"{path.relative_to(ROOT)}:{line_no}: docs/{page}#{section}")
    assert cited >= 10, "the scan found almost no citations: is the pattern still right?"
    assert not broken, "cited sections that do not exist:\n" + "\n".join(broken)


def test_no_new_citations_a_reader_cannot_open() -> None:
    found: Counter[str] = Counter()
    for path in (ROOT / "src").rglob("*.py"):
        hits = len(UNREADABLE.findall(path.read_text()))
        if hits:
            found[path.relative_to(ROOT).as_posix()] = hits
    grown = {name: count for name, count in found.items() if count > KNOWN_UNREADABLE[name]}
    assert not grown, f"cite docs/ instead of the design brief, issues or shared/ paths: {grown}"
