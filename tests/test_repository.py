"""Repository hygiene the docs promise: evals/results/ holds only results the docs cite, under the naming rule of
docs/benchmarks.md; no source file under lm/ or evals/ points outside the project."""

import itertools
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAME = re.compile(r"[a-z][a-z_]*?_(cpu|h200(x\d+)?)_\d{4}-\d{2}-\d{2}(_[a-z0-9_]+)?\.(json|md|png|txt)")


def cited_names() -> set[str]:
    """File names the README and docs/*.md mention, with `name.{json,md}` brace lists expanded."""
    text = "\n".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    names = set()
    for token in re.findall(r"[\w.\-{},/]+", text):
        parts = re.split(r"(\{[^}]*\})", token)
        options = [p[1:-1].split(",") if p.startswith("{") else [p] for p in parts]
        names.update("".join(c).rsplit("/", 1)[-1] for c in itertools.product(*options))
    return names


def test_every_result_file_is_cited_and_follows_the_naming_rule():
    files = sorted(p.name for p in (ROOT / "evals" / "results").iterdir())
    assert files
    assert [f for f in files if not NAME.fullmatch(f)] == []
    cited = cited_names()
    assert [f for f in files if f not in cited] == []


def test_no_source_file_cites_a_path_outside_the_project():
    pattern = re.compile(r"research/|\.\./shared|\bshared/")
    hits = [f"{p.relative_to(ROOT)}:{i}" for d in ("lm", "evals") for p in sorted((ROOT / d).rglob("*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == []
