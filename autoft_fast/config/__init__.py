"""Configuration: every section of an experiment YAML declared once and parsed once.

The bottom of the package's Python layers (above the op, below data, models, train and
the CLI): ``schema`` (the validation helper), ``sections`` (model, autoft, pretrain,
finetune), ``data`` and ``synthetic`` (the data sections), ``strategies`` (the strategy
table) and ``experiment`` (the whole file).

Example:
    >>> from autoft_fast.config import load_config
    >>> cfg = load_config(None)          # the embedded demo
    >>> cfg.model.name, cfg.autoft.tau
    ('dnn', 5.0)
"""
from .data import (DataConfig, DataError, DomainSpec, MultiHotColumn, NumericColumn, SourceSplit,
                   SplitSpec, TargetSplit, load_data_config, read_data_yaml)
from .experiment import (DEMO_CONFIG, TOP_LEVEL_KEYS, ExperimentConfig, config_hash, load_config,
                         parse_config, resolve_strategies)
from .schema import ConfigError, field_docs, parse_section, section_to_dict, setting
from .sections import (ARCH_KEYS, MODEL_NAMES, AutoFTConfig, ModelConfig,
                       PretrainConfig, SearchConfig, TrainConfig, tau_at)
from .strategies import FIELD_GATED, LAYER_GATED, STRATEGIES, STRATEGY_TABLE, Strategy
from .synthetic import DEFAULT_FIELDS, SyntheticConfig, SyntheticField

__all__ = ["ARCH_KEYS", "AutoFTConfig", "ConfigError", "DEFAULT_FIELDS",
           "DEMO_CONFIG", "DataConfig", "DataError", "DomainSpec", "ExperimentConfig",
           "FIELD_GATED", "LAYER_GATED", "MODEL_NAMES", "ModelConfig", "MultiHotColumn",
           "NumericColumn", "PretrainConfig", "SearchConfig", "STRATEGIES", "STRATEGY_TABLE", "SourceSplit",
           "SplitSpec", "Strategy", "SyntheticConfig", "SyntheticField", "TOP_LEVEL_KEYS",
           "TargetSplit", "TrainConfig", "config_hash", "field_docs", "load_config",
           "load_data_config", "parse_config", "parse_section", "read_data_yaml",
           "resolve_strategies", "section_to_dict", "setting", "tau_at"]
