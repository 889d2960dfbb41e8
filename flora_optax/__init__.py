"""flora_optax: Flora's compressed momentum and gradient accumulation as optax transforms.

Flora (Hao, Cao, Mou, ICML 2024, https://arxiv.org/abs/2402.03293) keeps the optimizer
buffers that are as large as the model (the momentum and the gradient accumulator) in a
random low-dimensional subspace, regenerates the projection from a PRNG key instead of
storing it, and resamples it over time so the updates stay full-rank.
"""

from flora_optax._compression import MatrixAxes
from flora_optax.accumulation import (
    FloraAccumulateState,
    compressed_mean,
    flora_accumulate,
    has_updated,
)
from flora_optax.alias import flora_adafactor
from flora_optax.inspect import (
    LeafMemory,
    MemoryReport,
    memory_report,
    projections,
    state_bytes,
)
from flora_optax.momentum import FloraMomentumState, flora_momentum
from flora_optax.sharding import state_shardings

__version__ = "0.1.0"

__all__ = [
    "FloraAccumulateState",
    "FloraMomentumState",
    "LeafMemory",
    "MatrixAxes",
    "MemoryReport",
    "compressed_mean",
    "flora_accumulate",
    "flora_adafactor",
    "flora_momentum",
    "has_updated",
    "memory_report",
    "projections",
    "state_bytes",
    "state_shardings",
]
