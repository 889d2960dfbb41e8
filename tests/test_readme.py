"""The README's Python snippets run as written (and print what the README says they print)."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_snippets():
  assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_snippet_runs(index, capsys):
  namespace = {}
  exec("import optax, flora_optax\n" + BLOCKS[index], namespace)  # noqa: S102
  printed = capsys.readouterr().out
  for comment in re.findall(r"# (loss [0-9.]+)", BLOCKS[index]):
    assert comment in printed, (comment, printed)
