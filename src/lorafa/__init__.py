"""lorafa: data-aware low-rank adaptation on top of PEFT."""

from .config import InitConfig
from .goat import goat_aux_loss, load_goat
from .integrations import initialize_trainer, lr_suggestion, trainer_stat_batches
from .kasa import kasa_loss
from .lr import LrSuggestion, suggest_lr
from .methods import InitResult, init_factors, resolve_method
from .fsdp import shard_adapters
from .peft_bridge import compute_init, initialize
from .plan import InitPlan, plan_init
from .ranks import allocate_ranks
from .saving import read_initial_adapter, save_adapter, save_initial_adapter
from .stats import LayerStats, collect_stats, load_stats, read_stats_config, save_stats, stat_batches

__version__ = "0.1.0"

__all__ = [
    "InitConfig", "InitPlan", "InitResult", "LayerStats", "LrSuggestion", "allocate_ranks", "collect_stats", "compute_init",
    "goat_aux_loss", "init_factors", "initialize", "initialize_trainer", "kasa_loss", "load_goat", "load_stats",
    "lr_suggestion", "plan_init", "read_initial_adapter", "read_stats_config", "resolve_method", "save_adapter",
    "save_initial_adapter", "save_stats", "shard_adapters", "stat_batches", "suggest_lr", "trainer_stat_batches",
]
