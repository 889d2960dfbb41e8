"""Plain float64 NumPy reference of Flora's Algorithms 1 and 2 (docs/spec.md).

Independent of the library except for the projection matrices themselves, which the tests
regenerate with ``flora_optax.projections`` (they are random by design; everything done
with them here is re-derived in NumPy).
"""

from __future__ import annotations

import numpy as np


class View:
  """A leaf viewed as a batch of (n, m) matrices, given its batch/row/col axes."""

  def __init__(self, shape, batch=(), rows=(0,), cols=(1,)):
    self.shape = tuple(shape)
    self.perm = tuple(batch) + tuple(rows) + tuple(cols)
    self.batch_shape = tuple(shape[a] for a in batch)
    self.n = int(np.prod([shape[a] for a in rows]))
    self.m = int(np.prod([shape[a] for a in cols]))

  def to(self, x):
    return np.transpose(np.asarray(x, np.float64), self.perm).reshape(
        self.batch_shape + (self.n, self.m))

  def back(self, x):
    x = x.reshape(tuple(self.shape[a] for a in self.perm))
    return np.transpose(x, np.argsort(self.perm))


def _matrix(a):
  """A projection as a float64 array (``flora_optax.projections`` gives ``{"a": A}``)."""
  return np.asarray(a["a"] if isinstance(a, dict) else a, np.float64)


def down(x, a, side):
  """x: (..., n, m); a: (..., r, d). cols: x aᵀ; rows: a x."""
  a = _matrix(a)
  if side == "cols":
    return x @ np.swapaxes(a, -1, -2)
  return a @ x


def up(c, a, side):
  a = _matrix(a)
  if side == "cols":
    return c @ a
  return np.swapaxes(a, -1, -2) @ c


def least_squares_fit(target, a, side):
  """The c minimising ‖up(c, a) − target‖ (per batch entry), by np.linalg.lstsq."""
  a = _matrix(a)
  batch = target.shape[:-2]
  out = []
  for idx in np.ndindex(*batch) if batch else [()]:
    t, ai = target[idx], a[idx]
    if side == "cols":  # c (n, r): c @ ai ≈ t  ⇔  aiᵀ cᵀ ≈ tᵀ
      out.append(np.linalg.lstsq(ai.T, t.T, rcond=None)[0].T)
    else:  # c (r, m): aiᵀ c ≈ t
      out.append(np.linalg.lstsq(ai.T, t, rcond=None)[0])
  return np.stack(out).reshape(batch + out[0].shape)


def momentum(grads, view, side, proj, decay, kappa, transfer="unbiased",
             emit="compressed"):
  """Algorithm 2 for one compressed leaf. proj(cycle) -> A. Returns outputs and final M."""
  outs = []
  m_state = None
  for t, g in enumerate(grads):
    cycle = 0 if kappa is None else t // kappa
    a = proj(cycle)
    g = view.to(g)
    if m_state is None:
      m_state = np.zeros_like(down(g, a, side))
    if kappa is not None and t > 0 and t % kappa == 0:
      old = up(m_state, proj(cycle - 1), side)
      if transfer == "unbiased":
        m_state = down(old, a, side)
      else:
        m_state = least_squares_fit(old, a, side)
    previous = m_state
    m_state = decay * m_state + (1 - decay) * down(g, a, side)
    if emit == "compressed":
      out = up(m_state, a, side)
    else:
      out = decay * up(previous, a, side) + (1 - decay) * g
    outs.append(view.back(out))
  return outs, m_state


def accumulate(grads, view, side, proj, every_k):
  """Algorithm 1 with MultiSteps semantics and an identity inner optimizer.

  every_k(gradient_step) -> k. Returns the emitted updates (zeros on inner micro-steps).
  """
  outs = []
  acc, mini, step = None, 0, 0
  for g in grads:
    a = proj(step)
    c = down(view.to(g), a, side)
    acc = c if mini == 0 else acc + (c - acc) / (mini + 1)
    if mini == every_k(step) - 1:
      outs.append(view.back(up(acc, a, side)))
      mini, step = 0, step + 1
    else:
      outs.append(np.zeros(view.shape))
      mini += 1
  return outs


def ema(grads, decay):
  out, mu = [], 0.0
  for g in grads:
    mu = decay * mu + (1 - decay) * np.asarray(g, np.float64)
    out.append(mu)
  return out
