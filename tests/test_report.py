"""memory_report / state_bytes on a GPT-2-small-shaped tree (never allocated)."""

import jax
import jax.numpy as jnp
import optax

import flora_optax


def gpt2_small(layers=12, width=768, vocab=50257, ctx=1024):
  f = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)  # noqa: E731
  block = {"ln_1": {"g": f(width), "b": f(width)},
           "attn": {"c_attn": {"w": f(width, 3 * width), "b": f(3 * width)},
                    "c_proj": {"w": f(width, width), "b": f(width)}},
           "ln_2": {"g": f(width), "b": f(width)},
           "mlp": {"c_fc": {"w": f(width, 4 * width), "b": f(4 * width)},
                   "c_proj": {"w": f(4 * width, width), "b": f(width)}}}
  return {"wte": f(vocab, width), "wpe": f(ctx, width),
          "h": [block] * layers, "ln_f": {"g": f(width), "b": f(width)}}


def _no_embeddings(params):
  return {k: (jax.tree.map(lambda _: False, v) if k in ("wte", "wpe") else None)
          for k, v in params.items()}


def test_gpt2_small_momentum_state_matches_the_formula():
  params = gpt2_small()
  n_params = sum(x.size for x in jax.tree.leaves(params))
  assert n_params == 124_439_808
  for rank in (64, 256):
    report = flora_optax.memory_report(params, rank)
    per_block = rank * (3 * 768 + 768 + 4 * 768 + 4 * 768) + 13 * 768  # + LayerNorms, biases
    expected = 12 * per_block + rank * (50257 + 1024) + 2 * 768
    assert report.flora_bytes == 4 * expected
    state = jax.eval_shape(flora_optax.flora_momentum(rank).init, params)
    # count, cycle, cycle_step, kappa and layout (4 bytes each) + key data (2 uint32)
    assert flora_optax.state_bytes(state) == 4 * expected + 5 * 4 + 8
    naive = flora_optax.state_bytes(jax.eval_shape(optax.ema(0.9).init, params))
    assert naive == 4 * n_params + 4
    without = flora_optax.memory_report(params, rank, mask=_no_embeddings(params))
    assert without.flora_bytes == report.flora_bytes + 4 * (50257 + 1024) * (768 - rank)
  # The headline ratios (naive momentum = 1): a compressed embedding matters most.
  r64 = flora_optax.memory_report(params, 64)
  assert 0.08 < r64.ratio < 0.09
  assert 0.33 < flora_optax.memory_report(params, 256).ratio < 0.34
  # docs/spec.md: "about 0.55x the naive momentum buffer" with the embeddings left out.
  assert 0.54 < flora_optax.memory_report(params, 256, mask=_no_embeddings(params)).ratio < 0.55


def test_report_text_names_every_leaf():
  params = {"dense": {"kernel": jnp.zeros((256, 128)), "bias": jnp.zeros(128)}}
  text = str(flora_optax.memory_report(params, 16))
  assert "params['dense']['kernel']" in text and "256x16" in text
  assert "params['dense']['bias']" in text and "(full)" in text
  assert "1/2 compressed" in text
