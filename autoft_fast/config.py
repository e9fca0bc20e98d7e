"""The experiment YAML: one file that names the data, the model, both training stages, the
AutoFT policy settings, the strategies to compare, the seeds and where runs are written.

```yaml
name: my-experiment        # optional; default: the file name without .yaml
data: dataset.yaml         # a path (relative to this file) or an inline mapping, parsed by
                           # autoft_fast.data.DataConfig.from_dict; may be omitted when
                           # `synthetic:` is given (the data is then generated)
synthetic: {...}           # optional, autoft_fast.data.SyntheticConfig: used by `generate`/`demo`
model: {name: dnn, ...}    # passed to autoft_fast.models.build_base_model
pretrain: {epochs: 2, lr: 0.001, batch_size: 1024, seed: 0, ...}   # TrainConfig keys + seed
finetune: {epochs: 5, lr: 0.001, policy_lr: 0.001, patience: 2, ...}  # TrainConfig keys
autoft: {backend: auto, tau: 1.0, ...}  # passed to build_transfer_model; see docs/cli.md
strategies: all            # or a list of names from autoft_fast.models.STRATEGIES
seeds: [0, 1]              # fine-tuning seeds; mean and std are taken over them
run_dir: runs              # relative to the working directory
cache_dir: null            # generated data and pre-trained models; default <run_dir>/cache
device: auto               # cpu, cuda, cuda:N, or auto (cuda when available, else cpu)
```

Every unknown key is an error that names it. Example:

    >>> cfg = load_config("experiment.yaml")
    >>> cfg.strategies, cfg.seeds
    (['finetune_all', 'autoft'], [0, 1])
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .train.trainer import TrainConfig

__all__ = ["ConfigError", "ExperimentConfig", "load_config", "parse_config", "DEMO_CONFIG",
           "resolve_strategies", "config_hash"]

DEMO_CONFIG = Path(__file__).with_name("configs") / "demo.yaml"

TOP_LEVEL_KEYS = ("name", "data", "synthetic", "model", "pretrain", "finetune", "autoft",
                  "strategies", "seeds", "run_dir", "cache_dir", "device")

# Defaults of the two training stages. Pre-training sees a large source set, so fewer epochs
# suffice; fine-tuning sees a small target set that over-fits fast, so early stopping
# (patience 2 on validation AUC) decides when to stop.
PRETRAIN_DEFAULTS = {"epochs": 2, "patience": 1}
FINETUNE_DEFAULTS = {"epochs": 5, "patience": 2}


class ConfigError(ValueError):
    """A problem with the experiment configuration; the CLI prints it in one line, exit 2."""


def config_hash(obj: Any) -> str:
    """Short stable hash of a JSON-able object (used to key caches of pre-trained models).

    Example:
        >>> config_hash({"a": 1}) == config_hash({"a": 1})
        True
    """
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def resolve_strategies(value) -> list[str]:
    """`all` or a list of strategy names -> a validated list (order kept, duplicates refused).

    Example:
        >>> resolve_strategies(["finetune_all", "autoft"])
        ['finetune_all', 'autoft']
    """
    from .models import STRATEGIES  # models sit beside config; imported when needed
    if value is None or value == "all":
        return list(STRATEGIES)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"strategies must be 'all' or a non-empty list of names, got {value!r}")
    out = []
    for s in value:
        if s not in STRATEGIES:
            raise ConfigError(f"unknown strategy {s!r}; choose from {', '.join(STRATEGIES)}")
        if s in out:
            raise ConfigError(f"strategy {s!r} is listed twice in strategies")
        out.append(s)
    return out


@dataclass
class ExperimentConfig:
    """A parsed experiment YAML (see the module docstring for the format)."""
    name: str
    base_dir: Path
    data: dict | str | None
    synthetic: dict | None
    model: dict
    pretrain: TrainConfig
    pretrain_seed: int
    finetune: TrainConfig
    autoft: dict
    strategies: list
    seeds: list
    run_dir: Path
    cache_dir: Path
    device: str = "auto"
    raw: dict = field(default_factory=dict)

    def torch_device(self):
        """The torch.device of `device` ('auto': cuda when available, else cpu)."""
        import torch
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dev = torch.device(self.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {self.device!r} was asked for but CUDA is not available")
        return dev

    def data_section(self) -> tuple[dict, Path]:
        """The `data:` mapping and the directory its relative paths are resolved against."""
        if self.data is None:
            raise ConfigError("the config has no data: section (give data: or synthetic:, "
                              "and run `autoft-fast generate` for synthetic data)")
        if isinstance(self.data, str):
            path = (self.base_dir / self.data).resolve()
            if not path.is_file():
                raise ConfigError(f"data: file {str(path)!r} does not exist")
            with open(path, encoding="utf-8") as f:
                d = yaml.safe_load(f)
            if isinstance(d, dict) and set(d) == {"data"}:
                d = d["data"]  # a dataset YAML as `generate` writes it
            if not isinstance(d, dict):
                raise ConfigError(f"data: file {str(path)!r} is not a YAML mapping")
            return d, path.parent
        return self.data, self.base_dir

    def data_config(self):
        """The DataConfig of the `data:` section (autoft_fast.data)."""
        from .data import DataConfig
        d, base = self.data_section()
        return DataConfig.from_dict(d, base)

    def synthetic_config(self):
        """The SyntheticConfig of the `synthetic:` section, or None."""
        if self.synthetic is None:
            return None
        from .data import SyntheticConfig
        if hasattr(SyntheticConfig, "from_dict"):
            return SyntheticConfig.from_dict(self.synthetic)
        return SyntheticConfig(**self.synthetic)

    def validate_sections(self) -> None:
        """Check the sections parsed by the data and model packages now, so that a typo fails
        at start-up rather than after minutes of data generation or pre-training."""
        from .models.config import AutoFTConfig, ModelConfig
        try:
            ModelConfig.from_dict(self.model)
            AutoFTConfig.from_dict(self.autoft)
            if self.synthetic is not None:
                self.synthetic_config()
            if self.data is not None:
                self.data_config()
        except ConfigError:
            raise
        except (ValueError, TypeError) as e:
            raise ConfigError(str(e)) from None

    def with_overrides(self, *, backend: str | None = None, seeds: int | None = None,
                       run_dir: str | Path | None = None, strategies: list | None = None,
                       device: str | None = None) -> "ExperimentConfig":
        """A copy with CLI overrides applied: `backend` goes to autoft['backend']; `seeds=N`
        keeps the first N configured seeds and extends them with consecutive integers."""
        c = copy.deepcopy(self)
        if backend is not None:
            c.autoft = dict(c.autoft, backend=backend)
            c.validate_sections()
        if seeds is not None:
            if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
                raise ConfigError(f"--seeds must be a positive integer, got {seeds!r}")
            base = list(c.seeds)
            while len(base) < seeds:
                base.append(max(base) + 1 if base else 0)
            c.seeds = base[:seeds]
        if run_dir is not None:
            c.run_dir = Path(run_dir).resolve()
            c.cache_dir = c.run_dir / "cache" if "cache_dir" not in c.raw else c.cache_dir
        if strategies is not None:
            c.strategies = resolve_strategies(strategies)
        if device is not None:
            c.device = _check_device(device, "--device")
        return c


def _check_device(value, where: str) -> str:
    import torch
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a string such as cpu, cuda or auto, got {value!r}")
    if value == "auto":
        return value
    try:
        dev = torch.device(value)
    except RuntimeError:
        raise ConfigError(f"{where} = {value!r} is not a device; use cpu, cuda, cuda:N or "
                          "auto") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"{where} = {value!r}: only cpu and cuda devices are supported")
    return value


def _mapping(raw: dict, key: str) -> dict:
    v = raw.get(key)
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ConfigError(f"{key}: must be a mapping, got {type(v).__name__} {v!r}")
    return dict(v)


def parse_config(raw: dict, base_dir: str | Path = ".", name: str = "experiment",
                 check_strategies: bool = True) -> ExperimentConfig:
    """Validate a config mapping (the parsed YAML) into an ExperimentConfig.

    Example:
        >>> parse_config({"synthetic": {}, "seeds": [0]}).seeds
        [0]
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"the config must be a YAML mapping, got {type(raw).__name__}")
    for k in raw:
        if k not in TOP_LEVEL_KEYS:
            raise ConfigError(f"unknown top-level key {k!r}; known keys: {', '.join(TOP_LEVEL_KEYS)}")
    base_dir = Path(base_dir).resolve()
    name = raw.get("name", name)
    if not isinstance(name, str) or not name or "/" in name:
        raise ConfigError(f"name must be a non-empty string without '/', got {name!r}")

    data = raw.get("data")
    if data is not None and not isinstance(data, (dict, str)):
        raise ConfigError(f"data: must be a mapping or a path to a dataset YAML, got {data!r}")
    synthetic = raw.get("synthetic")
    if synthetic is not None and not isinstance(synthetic, dict):
        raise ConfigError(f"synthetic: must be a mapping, got {synthetic!r}")
    if data is None and synthetic is None:
        raise ConfigError("the config needs a data: section or a synthetic: section")

    pre = {**PRETRAIN_DEFAULTS, **_mapping(raw, "pretrain")}
    pretrain_seed = pre.pop("seed", 0)
    if isinstance(pretrain_seed, bool) or not isinstance(pretrain_seed, int) or pretrain_seed < 0:
        raise ConfigError(f"pretrain.seed must be a non-negative integer, got {pretrain_seed!r}")
    try:
        pretrain = TrainConfig.from_dict(pre, "pretrain")
        finetune = TrainConfig.from_dict({**FINETUNE_DEFAULTS, **_mapping(raw, "finetune")},
                                         "finetune")
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None

    seeds = raw.get("seeds", [0, 1])
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    if (not isinstance(seeds, list) or not seeds
            or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds)):
        raise ConfigError(f"seeds must be a non-empty list of non-negative integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds must not repeat, got {seeds!r}")

    strategies = raw.get("strategies", "all")
    strategies = resolve_strategies(strategies) if check_strategies else strategies

    run_dir = raw.get("run_dir", "runs")
    if not isinstance(run_dir, str) or not run_dir:
        raise ConfigError(f"run_dir must be a path string, got {run_dir!r}")
    run_dir = Path(run_dir).expanduser().resolve()
    cache_dir = raw.get("cache_dir")
    if cache_dir is not None and not isinstance(cache_dir, str):
        raise ConfigError(f"cache_dir must be a path string, got {cache_dir!r}")
    cache_dir = Path(cache_dir).expanduser().resolve() if cache_dir else run_dir / "cache"

    cfg = ExperimentConfig(name=name, base_dir=base_dir, data=data, synthetic=synthetic,
                           model=_mapping(raw, "model"), pretrain=pretrain,
                           pretrain_seed=pretrain_seed, finetune=finetune,
                           autoft=_mapping(raw, "autoft"), strategies=strategies,
                           seeds=list(seeds), run_dir=run_dir, cache_dir=cache_dir,
                           device=_check_device(raw.get("device", "auto"), "device"), raw=raw)
    cfg.validate_sections()
    return cfg


def load_config(path: str | Path | None = None) -> ExperimentConfig:
    """Read and validate an experiment YAML; `None` loads the embedded demo config.

    Example:
        >>> load_config(None).name
        'demo'
    """
    path = Path(path) if path is not None else DEMO_CONFIG
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: "
                          f"{str(e).splitlines()[0]}") from None
    if raw is None:
        raise ConfigError(f"config file {str(path)!r} is empty")
    stem = path.name[:-5] if path.name.endswith(".yaml") else path.stem
    return parse_config(raw, path.parent, name=stem)
