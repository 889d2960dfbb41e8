"""Online low-rank factors: the paper's simultaneous Newton steps against the sequential ones.

LoRA-Pre (Wang et al., ICLR 2026) updates ``B`` and ``A`` both from the previous factors;
``flora_optax`` updates ``A`` from the new ``B``. This compares the two in float64 NumPy on
synthetic gradient streams (200 × 120, decay 0.9, k = 8, 300 steps, exact least squares):
cosine and norm ratio of ``B A`` to the true EMA after the first fold and over the last 50
steps, beside the EMA's own best rank-``k`` truncation (its cosine with the EMA).

    python -m benchmarks.factor_forms
"""

from __future__ import annotations

import numpy as np

N, M, K, DECAY, STEPS = 200, 120, 8, 0.9, 300


def track(stream, sequential: bool, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  a = np.linalg.qr(rng.standard_normal((M, K)))[0].T
  b = np.zeros((N, K))
  ema = np.zeros((N, M))
  keep = np.sqrt(DECAY)
  cos, norm = [], []
  for g in stream:
    ema = DECAY * ema + (1 - DECAY) * g
    b_new = keep * b + (1 - keep) * g @ np.linalg.pinv(a)
    a = keep * a + (1 - keep) * np.linalg.pinv(b_new if sequential else b) @ g
    b = b_new
    x = b @ a
    cos.append(np.sum(x * ema) / np.linalg.norm(x) / np.linalg.norm(ema))
    norm.append(np.linalg.norm(x) / np.linalg.norm(ema))
  u, s, vt = np.linalg.svd(ema)
  best = (u[:, :K] * s[:K]) @ vt[:K]
  return {"first cosine": cos[0], "first norm": norm[0], "cosine": np.mean(cos[-50:]),
          "norm": np.mean(norm[-50:]),
          "best rank-k cosine": np.sum(best * ema) / np.linalg.norm(best) / np.linalg.norm(ema)}


def streams(rng):
  u, v = rng.standard_normal((N, 5)), rng.standard_normal((5, M))
  low = lambda noise: [u @ np.diag(rng.standard_normal(5) + 1) @ v  # noqa: E731
                       + noise * rng.standard_normal((N, M)) for _ in range(STEPS)]
  return {"near low-rank (noise 0.1)": low(0.1), "noisy (noise 1.0)": low(1.0),
          "pure noise": [rng.standard_normal((N, M)) for _ in range(STEPS)]}


def main() -> None:
  print("| stream | form | first cosine | first norm | cosine | norm | best rank-k cosine |")
  print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
  for name, stream in streams(np.random.default_rng(1)).items():
    for form, sequential in (("paper (simultaneous)", False), ("flora_optax (sequential)", True)):
      r = track(stream, sequential)
      print(f"| {name} | {form} | {r['first cosine']:.3f} | {r['first norm']:.3f} | "
            f"{r['cosine']:.3f} | {r['norm']:.3f} | {r['best rank-k cosine']:.3f} |")


if __name__ == "__main__":
  main()
