"""The Python snippets of README.md and docs/**/*.md run as written.

Each page's ```python blocks run in order in one namespace (a block may use what an earlier
block of the same page defined). A block is skipped when the last non-blank line before its
fence is an HTML comment starting with ``<!-- skip-snippet`` (a fragment that cannot run on its
own; say why in the comment). Where a ``print(...)`` line ends with a comment, as in
``print(f"loss {loss(params):.3f}")  # loss 1.208``, the comment is what the block must print.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SKIP_MARKER = "<!-- skip-snippet"
FENCE = re.compile(r"^(\s*)```python\s*$")
PRINTS = re.compile(r"^\s*print\(.*\)\s*#\s*(?P<expected>\S.*?)\s*$")


@dataclasses.dataclass(frozen=True)
class Snippet:
  line: int  # of the first code line, 1-based
  code: str
  skipped: bool

  def expected_output(self) -> list[str]:
    return [m["expected"] for m in map(PRINTS.match, self.code.splitlines()) if m]


def snippets(page: pathlib.Path) -> list[Snippet]:
  lines = page.read_text(encoding="utf-8").splitlines()
  found, i = [], 0
  while i < len(lines):
    if not FENCE.match(lines[i]):
      i += 1
      continue
    end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), len(lines))
    before = next((line.strip() for line in reversed(lines[:i]) if line.strip()), "")
    found.append(Snippet(i + 2, textwrap.dedent("\n".join(lines[i + 1:end])) + "\n",
                         before.startswith(SKIP_MARKER)))
    i = end + 1
  return found


PAGES = [p for p in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))] if snippets(p)]


def test_the_readme_and_the_docs_have_snippets():
  names = [str(p.relative_to(ROOT)) for p in PAGES]
  assert "README.md" in names and "docs/index.md" in names, names
  assert len(snippets(ROOT / "README.md")) >= 2


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_snippets_run(page, capsys):
  namespace: dict = {"__name__": "__snippet__"}
  for snippet in snippets(page):
    if snippet.skipped:
      continue
    where = f"{page.relative_to(ROOT)}:{snippet.line}"
    exec(compile(snippet.code, where, "exec"), namespace)  # noqa: S102
    printed = capsys.readouterr().out
    for expected in snippet.expected_output():
      assert expected in printed, f"{where}: expected {expected!r} in the output:\n{printed}"
