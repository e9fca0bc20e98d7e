"""Data for AutoFT: config, shared vocabulary, cached tensors, batches, synthetic generator.

Example::

    from autoft_fast.data import DataConfig, prepare_data, iterate_batches
    cfg = DataConfig.from_dict(yaml.safe_load(open("exp.yaml"))["data"], base_dir=Path("."))
    bundle = prepare_data(cfg)
    for batch in iterate_batches(bundle.splits["target_train"], 4096, shuffle=True):
        ...
"""

from .config import (DataConfig, DataError, MultiHotColumn, NumericColumn, SourceSplit, TargetSplit,
                     load_data_config)
from .feature_map import FeatureMap, FieldInfo
from .pipeline import cache_key, prepare_data
from .synthetic import SyntheticConfig, SyntheticField, build_synthetic, generate_synthetic
from .tensors import SPLIT_NAMES, DataBundle, TensorData, iterate_batches

__all__ = [
    "DataBundle", "DataConfig", "DataError", "FeatureMap", "FieldInfo", "MultiHotColumn",
    "NumericColumn", "SPLIT_NAMES", "SourceSplit", "SyntheticConfig", "SyntheticField", "TargetSplit",
    "TensorData", "build_synthetic",
    "cache_key", "generate_synthetic", "iterate_batches", "load_data_config", "prepare_data",
]
