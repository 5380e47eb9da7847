"""Docs point at things that exist: every relative markdown link (and its #anchor) in the README, docs/ and the
results index resolves, and every results file that docs, benchmarks and tests cite is in the repository."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKDOWN = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
            *sorted((ROOT / "benchmarks/results").glob("*.md"))]
CITING = [*MARKDOWN, *sorted((ROOT / "benchmarks").glob("*.py")), *sorted((ROOT / "benchmarks").glob("*.sh")),
          *sorted((ROOT / "tests").rglob("*.py")), *sorted((ROOT / "pensieve").rglob("*.py"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
# a cited results path: benchmarks/results/ and at least one more component; `--out X`, `OUT=X` and
# `default="X"` name where a run writes, not what it wrote, as does a dated `run-DATE`
CITED = re.compile(r"(?<!--out )(?<!OUT=)(?<!default=\")(?<!OUT:-)"
                   r"\bbenchmarks/results/(?!run-)[\w.+-]+(?:/[\w.*+-]+)*/?")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (but - and _), spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, flags=re.M)}


def test_relative_markdown_links_resolve() -> None:
    broken = []
    for doc in MARKDOWN:
        for target in LINK.findall(doc.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            path_part, _, anchor = target.partition("#")
            dest = (doc.parent / path_part).resolve() if path_part else doc
            if not dest.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_cited_results_paths_exist() -> None:
    missing = []
    for src in CITING:
        for cited in CITED.findall(src.read_text()):
            cited = cited.rstrip(".")
            if "*" in cited:
                found = list(ROOT.glob(cited.rstrip("/")))
            else:
                found = [ROOT / cited] if (ROOT / cited).exists() else []
            if not found:
                missing.append(f"{src.relative_to(ROOT)}: {cited}")
    assert not missing, "\n".join(missing)
