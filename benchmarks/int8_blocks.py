"""Error and memory of int8 block storage against the block size (why ``INT8_BLOCK = 256``).

Each buffer is quantized once with stochastic rounding and once to nearest, with blocks of
``B`` entries along its last axis (a row shorter than ``B`` is one block), as
``flora_optax.Int8Blocks`` stores it. Reported: the RMS error relative to the buffer's RMS, and
the bytes per entry (1 for the code plus 4 per block for the scale); "2048 flat" is
bitsandbytes' layout (blocks over the flattened array, across rows). Buffers:

* ``gaussian rows (n, 3072)``: a projection buffer ``(rank, m)`` of the larger side; entries
  are sums of many terms (close to Gaussian), rows with log-normal norms (rows of real
  gradients differ by orders of magnitude);
* ``gaussian rows (n, 256)``: a ``(n, rank)`` buffer at rank 256, same statistics;
* ``student-t (3 dof) (n, 3072)``: heavy tails, as a full-size EMA of raw gradients has.

    python -m benchmarks.int8_blocks
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import _harness
from flora_optax import _buffers

BLOCKS = (32, 64, 128, 256, 512, 2048)


def buffers(rng) -> dict[str, np.ndarray]:
  norms = np.exp(rng.standard_normal((512, 1)))
  return {
      "gaussian rows (512, 3072)": rng.standard_normal((512, 3072)) * norms,
      "gaussian rows (512, 256)": rng.standard_normal((512, 256)) * norms,
      "student-t (3 dof) (512, 3072)": rng.standard_t(3, (512, 3072)) * norms,
  }


def measure() -> list[list]:
  rng = np.random.default_rng(0)
  rows = []
  for name, x in buffers(rng).items():
    x32 = jnp.asarray(x, jnp.float32)
    rms = float(np.sqrt(np.mean(x**2)))
    for block in BLOCKS:
      errors = []
      for key in (jax.random.key(0), None):
        back = _buffers.dequantize(_buffers.quantize(x32, key, block))
        errors.append(float(np.sqrt(np.mean((np.asarray(back, np.float64) - x)**2))) / rms)
      bytes_per_entry = 1 + 4 * _buffers.num_blocks(x.shape[-1], block) / x.shape[-1]
      rows.append([name, block, f"{errors[0]:.4f}", f"{errors[1]:.4f}",
                   f"{bytes_per_entry:.3f}"])
    # bitsandbytes' layout: blocks of 2048 over the flattened buffer, across rows.
    flat = x32.reshape(-1, 2048)
    errors = [float(np.sqrt(np.mean((np.asarray(_buffers.dequantize(_buffers.quantize(
        flat, key, 2048)), np.float64).reshape(x.shape) - x)**2))) / rms
              for key in (jax.random.key(0), None)]
    rows.append([name, "2048 flat", f"{errors[0]:.4f}", f"{errors[1]:.4f}", "1.002"])
  return rows


def main() -> None:
  header = ["buffer", "block", "rel. RMS error (stochastic)", "rel. RMS error (nearest)",
            "bytes / entry"]
  print(_harness.markdown_table(header, measure()))


if __name__ == "__main__":
  main()
