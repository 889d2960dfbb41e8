"""flora_optax: Flora's compressed momentum and gradient accumulation as optax transforms.

Flora (Hao, Cao, Mou, ICML 2024, https://arxiv.org/abs/2402.03293) keeps the optimizer
buffers that are as large as the model (the momentum and the gradient accumulator) in a
random sketch, regenerates the random matrices from a PRNG key instead of storing them, and
resamples them over time so the updates stay full-rank.

Layers, bottom up: ``_layout`` (which leaves, which matrix views), ``_options`` (options,
checks, keys), ``_sketches`` (the compression methods), ``_buffers`` (trees of compressed
buffers: the one pipeline), the transforms (``momentum``, ``accumulation``,
``microbatching``, ``ema``), ``alias`` and ``muon`` (chains), and ``report``, ``sharding``,
``multihost``, ``checkpoint``.
"""

from flora_optax._buffers import INT8_BLOCK, Compressed, Int8Blocks
from flora_optax._layout import MatrixAxes
from flora_optax._options import Compression
from flora_optax.checkpoint import check_layout, restore
from flora_optax.accumulation import FloraAccumulateState, flora_accumulate, has_updated
from flora_optax.alias import (
    FactoredMoment,
    ScaleByFloraAdamState,
    flora_adafactor,
    flora_adamw,
    scale_by_flora_adam,
)
from flora_optax.ema import Int8EmaState, int8_ema
from flora_optax.microbatching import compressed_mean
from flora_optax.momentum import FloraMomentumState, flora_momentum
from flora_optax.multihost import check_processes_agree
from flora_optax.muon import flora_muon, scale_by_flora_muon, scale_by_muon_shape
from flora_optax.report import LeafMemory, MemoryReport, memory_report, projections, state_bytes
from flora_optax.sharding import state_shardings

__version__ = "0.2.0.dev0"

__all__ = [
    "Compressed",
    "Compression",
    "FactoredMoment",
    "FloraAccumulateState",
    "FloraMomentumState",
    "INT8_BLOCK",
    "Int8Blocks",
    "Int8EmaState",
    "LeafMemory",
    "MatrixAxes",
    "MemoryReport",
    "ScaleByFloraAdamState",
    "check_layout",
    "check_processes_agree",
    "compressed_mean",
    "flora_accumulate",
    "flora_adafactor",
    "flora_adamw",
    "flora_momentum",
    "flora_muon",
    "has_updated",
    "int8_ema",
    "memory_report",
    "projections",
    "restore",
    "scale_by_flora_adam",
    "scale_by_flora_muon",
    "scale_by_muon_shape",
    "state_bytes",
    "state_shardings",
]
