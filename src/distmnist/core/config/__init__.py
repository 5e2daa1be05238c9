"""One config schema for every strategy: YAML file + ``section.key=value`` overrides.

    cfg = load_config("configs/fashion.yaml", ["optim.lr=0.1", "model.hidden=[256,256]"])

Values on the command line are parsed as YAML scalars/lists, then checked against the schema: an
unknown key, a wrong type or an impossible value raises :class:`DistMnistError` naming the key.
"""

from __future__ import annotations

from distmnist.core.config.loading import (
    SHIPPED_CONFIGS,
    config_from_flat,
    load_config,
    parse_override,
    read_run_header,
    resolve_path,
    run_config_text,
    run_name,
    to_yaml,
)
from distmnist.core.config.schema import (
    ACCELERATORS,
    DATASETS,
    LOADERS,
    OPTIMIZERS,
    PARALLEL,
    PRECISIONS,
    SCHEDULES,
    STRATEGIES,
    TRAJECTORY_KEYS,
    Batching,
    CheckpointConfig,
    Config,
    DataConfig,
    DistConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
    batching,
    flat_dict,
    identity,
    known_keys,
    trajectory,
    validate,
)

__all__ = [
    "ACCELERATORS", "DATASETS", "LOADERS", "OPTIMIZERS", "PARALLEL", "PRECISIONS", "SCHEDULES", "SHIPPED_CONFIGS",
    "STRATEGIES", "TRAJECTORY_KEYS", "Batching", "CheckpointConfig", "Config", "DataConfig", "DistConfig",
    "ModelConfig", "OptimConfig", "RunConfig", "TrainConfig", "batching", "config_from_flat", "flat_dict",
    "identity", "known_keys", "load_config", "parse_override", "read_run_header", "resolve_path", "run_config_text",
    "run_name", "to_yaml", "trajectory", "validate",
]
