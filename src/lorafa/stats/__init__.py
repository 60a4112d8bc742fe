"""Statistics pass: gradients, K-FAC factors and input covariances, streamed, all-reduced and cached."""

from .cache import load_cached_stats, load_stats, read_stats_config, save_stats
from .collect import KINDS, StatsRecorder, collect_stats, normalize_kinds
from .distributed import RankFailedError
from .fisher import sampled_label_loss
from .fingerprint import weights_fingerprint
from .sampling import sample_indices, shard_batches, stat_batches
from .types import LayerStats

__all__ = [
    "sampled_label_loss",
    "KINDS", "LayerStats", "RankFailedError", "StatsRecorder", "collect_stats", "load_cached_stats", "load_stats",
    "normalize_kinds", "read_stats_config", "sample_indices", "save_stats", "shard_batches", "stat_batches",
    "weights_fingerprint",
]
