"""optax's own common test suite for contributed optimizers, run against ours.

The suite (``optax/contrib/_common_test.py`` of the installed optax) is loaded from its source
at test time and re-targeted: its lists of optimizers under test are replaced by Flora's, and
its factory lookup by ``flora_optax``'s. Everything else (jit without recompiling, extra
arguments, convergence on four targets over 30 000 steps, ``inject_hyperparams`` with only
``rank`` static, dtype preservation, ``MultiSteps``, state dtype stability under ``lax.cond``,
learning-rate schedules) runs as optax wrote it. Skipped if this optax does not ship the file.
"""

import pathlib
import types

import optax
import pytest

import flora_optax

SOURCE = pathlib.Path(optax.__file__).parent / "contrib" / "_common_test.py"
if not SOURCE.exists():
  pytest.skip(f"this optax ({optax.__version__}) does not ship {SOURCE.name}",
              allow_module_level=True)
pytest.importorskip("absl.testing.parameterized")

# rank 1 compresses the 2x2 matrix targets; kappa 50 resamples many times in 30 000 steps.
OURS = (
    {"opt_name": "flora_adafactor", "opt_kwargs": {"learning_rate": 1e-2, "rank": 1, "kappa": 50}},
    {"opt_name": "flora_adafactor", "opt_kwargs": {"learning_rate": 1e-2, "rank": 1, "kappa": 50,
                                                    "sketch": "two_sided"}},
    {"opt_name": "flora_adamw", "opt_kwargs": {"learning_rate": 1e-2, "rank": 1, "kappa": 50}},
    {"opt_name": "flora_adamw", "opt_kwargs": {"learning_rate": 1e-2, "rank": 1, "kappa": 50,
                                                "second_moment": "factored"}},
)
for entry in OURS:
  entry.update(wrapper_name=None, wrapper_kwargs=None)

RETARGET = '''
_MAIN_OPTIMIZERS_UNDER_TEST = _FLORA_OPTIMIZERS
_ALL_OPTIMIZERS_UNDER_TEST = _FLORA_OPTIMIZERS


def _get_opt_factory(opt_name):
  return getattr(_flora_optax, opt_name)


class ContribTest('''


def _load_suite():
  text = SOURCE.read_text()
  if text.count("\nclass ContribTest(") != 1:
    pytest.skip(f"{SOURCE} has changed shape (no single ContribTest class)")
  module = types.ModuleType("optax_common_suite_for_flora")
  module._FLORA_OPTIMIZERS = OURS
  module._flora_optax = flora_optax
  exec(compile(text.replace("\nclass ContribTest(", RETARGET, 1), str(SOURCE), "exec"),
       module.__dict__)
  return module.ContribTest


FloraContribTest = _load_suite()
