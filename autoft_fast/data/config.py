"""The ``data:`` section, as the data pipeline reads it; declared (once) in
:mod:`autoft_fast.config.data`, the full format with an example in ``docs/data.md``.

Example::

    from autoft_fast.data.config import DataConfig
    cfg = DataConfig.from_dict(yaml.safe_load(open("data.yaml"))["data"], Path("."))
"""
from ..config.data import (FILE_SUFFIXES, DataConfig, DataError, DomainSpec, MultiHotColumn,
                           NumericColumn, SourceSplit, SplitSpec, TargetSplit, load_data_config)

__all__ = ["FILE_SUFFIXES", "DataConfig", "DataError", "DomainSpec", "MultiHotColumn",
           "NumericColumn", "SourceSplit", "SplitSpec", "TargetSplit", "load_data_config"]
