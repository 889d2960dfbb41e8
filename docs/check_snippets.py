"""Runs the ```python blocks of documentation pages, in order, one namespace per page.

    python docs/check_snippets.py                 # the pages written with runnable snippets
    python docs/check_snippets.py docs/index.md   # or any pages

It fails on the first block that raises. The printed output is what the ```text blocks
after the snippets show (numbers from a CPU run; compare by eye, they are not asserted).
"""

from __future__ import annotations

import pathlib
import re
import sys
import time

DOCS = pathlib.Path(__file__).resolve().parent
PAGES = ["index.md", "howto/optax.md", "howto/microbatching.md"]


def run_page(path: pathlib.Path) -> None:
  blocks = re.findall(r"```python\n(.*?)```", path.read_text(), re.S)
  print(f"== {path.relative_to(DOCS.parent)}: {len(blocks)} blocks")
  namespace: dict = {}
  for i, block in enumerate(blocks):
    start = time.perf_counter()
    exec(compile(block, f"{path.name}[{i}]", "exec"), namespace)  # noqa: S102
    print(f"   block {i} ok ({time.perf_counter() - start:.1f} s)")


def main(argv: list[str]) -> None:
  pages = [pathlib.Path(p).resolve() for p in argv] or [DOCS / p for p in PAGES]
  for page in pages:
    run_page(page)


if __name__ == "__main__":
  main(sys.argv[1:])
