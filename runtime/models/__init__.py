"""plait.runtime.models: dense and mixture-of-experts decoder-only transformers.

Nothing here knows about parallelism; the parallel wrappers shard these modules.
"""

from plait.runtime.models.config import ModelConfig
from plait.runtime.models.transformer import Transformer, count_parameters


def build_model(cfg: ModelConfig) -> Transformer:
    """Validate ``cfg`` (raises plait.errors.ConfigError) and build the model on the current device."""
    cfg.validate()
    return Transformer(cfg)


__all__ = ["ModelConfig", "Transformer", "build_model", "count_parameters"]
