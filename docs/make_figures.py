"""Draws the figures of docs/concepts.md into docs/img/ (run from the repository root).

    python docs/make_figures.py

Each figure is measured, not drawn by hand: the projections come from
``flora_optax.projections``, the same matrices the transforms use.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import flora_optax  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "img")
D = 256          # compressed dimension of the example matrix
ROWS = 64        # rows of the example matrix
DRAWS = 64       # projections averaged per rank (cycles 0..DRAWS-1)


def relative_error(projection: str, rank: int) -> float:
  """Mean of ‖G AᵀA − G‖² / ‖G‖² over DRAWS projections for a fixed random G."""
  g = jax.random.normal(jax.random.key(7), (ROWS, D))
  params = {"w": jnp.zeros((ROWS, D))}

  def one(cycle):
    a = flora_optax.projections(params, rank=rank, cycle=cycle, side="cols",
                                projection=projection)["w"]["a"]
    g_hat = (g @ a.T) @ a
    return jnp.sum((g_hat - g) ** 2) / jnp.sum(g ** 2)

  return float(jnp.mean(jax.vmap(one)(jnp.arange(DRAWS))))


def noise_figure(path: str) -> None:
  ranks = [8, 16, 32, 64, 128, 192, 240]  # r = d leaves a leaf uncompressed
  ratios = np.array(ranks) / D
  fig, ax = plt.subplots(figsize=(6, 3.6))
  for projection, theory, style in (("gaussian", lambda r: (D + 1) / r, "o"),
                                    ("orthogonal", lambda r: D / r - 1, "s")):
    measured = [relative_error(projection, r) for r in ranks]
    ax.plot(ratios, measured, style, label=f"{projection}, measured")
    fine = np.linspace(ranks[0], D, 200)
    ax.plot(fine / D, [theory(r) for r in fine], "-", color=ax.lines[-1].get_color(),
            alpha=0.6, label=f"{projection}: " + ("(d+1)/r" if projection == "gaussian"
                                                   else "d/r − 1"))
  ax.set_yscale("symlog", linthresh=0.1)
  ax.set_xlabel("r / d")
  ax.set_ylabel("E‖G AᵀA − G‖² / ‖G‖²")
  ax.set_title(f"Noise of one compress/decompress (d = {D})")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def rank_figure(path: str) -> None:
  """Singular values of a sum of T decompressed gradients: fixed vs resampled projection."""
  rank, steps, n = 8, 64, 64
  params = {"w": jnp.zeros((n, D))}
  grads = jax.random.normal(jax.random.key(3), (steps, n, D))

  def total(resample: bool):
    def body(acc, t):
      cycle = t if resample else 0
      a = flora_optax.projections(params, rank=rank, cycle=cycle, side="cols")["w"]["a"]
      return acc + (grads[t] @ a.T) @ a, None
    acc, _ = jax.lax.scan(body, jnp.zeros((n, D)), jnp.arange(steps))
    return np.linalg.svd(np.asarray(acc), compute_uv=False)

  fig, ax = plt.subplots(figsize=(6, 3.6))
  exact = np.linalg.svd(np.asarray(grads.sum(0)), compute_uv=False)
  for label, s in (("no compression", exact), ("one fixed A (LoRA-like)", total(False)),
                   ("A resampled every step (Flora)", total(True))):
    ax.semilogy(np.arange(1, len(s) + 1), s / s[0], label=label)
  ax.axvline(rank, color="gray", ls=":")
  ax.set_ylim(1e-8, 2)
  ax.set_xlabel("singular value index")
  ax.set_ylabel("σ_i / σ_1")
  ax.set_title(f"Sum of {steps} compressed updates, rank {rank}, {n}×{D}")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main() -> None:
  os.makedirs(OUT, exist_ok=True)
  noise_figure(os.path.join(OUT, "projection_noise.png"))
  rank_figure(os.path.join(OUT, "update_rank.png"))
  print("wrote", sorted(os.listdir(OUT)))


if __name__ == "__main__":
  main()
