"""The experiment YAML: one file that names the data, the model, both training stages, the
AutoFT policy settings, the strategies to compare, the seeds and where runs are written.

```yaml
name: my-experiment        # optional; default: the file name without .yaml
data: dataset.yaml         # a path (relative to this file) or an inline mapping
                           # (autoft_fast.config.DataConfig); may be omitted when
                           # `synthetic:` is given (the data is then generated)
synthetic: {...}           # optional, autoft_fast.config.SyntheticConfig: used by `generate`/`demo`
model: {name: dnn, ...}    # autoft_fast.config.ModelConfig
pretrain: {epochs: 2, lr: 0.001, batch_size: 1024, seed: 0, ...}   # PretrainConfig
finetune: {epochs: 5, lr: 0.001, patience: 2, ...}                 # TrainConfig
autoft: {backend: auto, tau: 5.0, policy_lr: 0.001, ...}           # AutoFTConfig
strategies: all            # or a list of names from autoft_fast.config.STRATEGIES
seeds: [0, 1]              # fine-tuning seeds; mean and std are taken over them
search: {lr: [...], ...}   # the grid of `compare --tune` (autoft_fast.config.SearchConfig)
targets: null              # or a list of domain values: each in turn the target, the other
                           # listed domains (and the data's own source and target) the source
run_dir: runs              # relative to the working directory
cache_dir: null            # generated data and pre-trained models; default <run_dir>/cache
device: auto               # cpu, cuda, cuda:N, or auto (cuda when available, else cpu)
```

Every section is parsed once, here, into its typed object; every unknown key is an error
that names it. Example:

    >>> cfg = load_config("experiment.yaml")
    >>> cfg.strategies, cfg.seeds, cfg.autoft.tau
    (['finetune_all', 'autoft'], [0, 1], 5.0)
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from .._io import read_yaml_file
from .data import DataConfig, read_data_yaml
from .fuxictr import (FuxiCTRImport, FuxiCTRWarning, expand_fuxictr, fuxictr_to_experiment,
                      looks_like_fuxictr)
from .schema import ConfigError, reject_unknown
from .sections import AutoFTConfig, ModelConfig, PretrainConfig, SearchConfig, TrainConfig
from .strategies import STRATEGIES, STRATEGY_TABLE
from .synthetic import SyntheticConfig

__all__ = ["ExperimentConfig", "load_config", "load_fuxictr", "parse_config", "DEMO_CONFIG",
           "resolve_strategies", "config_hash", "TOP_LEVEL_KEYS"]

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"

TOP_LEVEL_KEYS = ("name", "data", "synthetic", "model", "pretrain", "finetune", "autoft",
                  "strategies", "seeds", "targets", "search", "run_dir", "cache_dir", "device")


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


def _seeds(value) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        # `--seeds 3` on the command line is a count; `seeds: 3` read as the one seed 3
        # would silently mean something else, so the YAML asks for the list.
        count = (f"seeds: {list(range(value))} for {value} seeds (--seeds {value} on the command "
                 f"line is such a count)" if 1 < value <= 10 else "a list such as [0, 1, 2]")
        raise ConfigError(f"seeds is a list of seed values, got the number {value}: write "
                          f"seeds: [{value}] for the one seed {value}, or {count}")
    if (not isinstance(value, list) or not value
            or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in value)):
        raise ConfigError(f"seeds must be a non-empty list of non-negative integers, got {value!r}")
    if len(set(value)) != len(value):
        raise ConfigError(f"seeds must not repeat, got {value!r}")
    return list(value)


def _path(value, key: str) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key} must be a path string, got {value!r}")
    return Path(value).expanduser().resolve()


@dataclass
class ExperimentConfig:
    """A parsed experiment YAML (see the module docstring): every section a typed object.

    Example:
        >>> cfg = parse_config({"synthetic": {}, "autoft": {"tau": 2}})
        >>> cfg.autoft.tau, cfg.pretrain.seed, cfg.finetune.epochs
        (2.0, 0, 50)
    """
    name: str
    base_dir: Path
    data: DataConfig | None
    synthetic: SyntheticConfig | None
    model: ModelConfig
    pretrain: PretrainConfig
    finetune: TrainConfig
    autoft: AutoFTConfig
    strategies: list
    seeds: list
    run_dir: Path
    cache_dir: Path
    device: str = "auto"
    targets: list | None = None
    search: SearchConfig = dataclasses.field(default_factory=SearchConfig)
    cache_dir_given: bool = False  # False: cache_dir follows run_dir (<run_dir>/cache)

    def torch_device(self):
        """The torch.device of `device` ('auto': cuda when available, else cpu)."""
        import torch
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dev = torch.device(self.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {self.device!r} was asked for but CUDA is not available")
        return dev

    def resolved_backend(self) -> str:
        """The gated-embedding backend a run uses: autoft.backend, with 'auto' resolved to
        the fastest one available on the run's device.

        Example:
            >>> parse_config({"synthetic": {}, "device": "cpu"}).resolved_backend()  # doctest: +SKIP
            'cpu'
        """
        if self.autoft.backend != "auto":
            return self.autoft.backend
        from ..ops import available_backends
        return available_backends(self.torch_device())[0]

    def to_dict(self, *, resolve_backend: bool = False) -> dict:
        """The effective config as a YAML-safe mapping (defaults filled in, paths absolute)
        that :func:`parse_config` reads back to an equal config; with ``resolve_backend``,
        autoft.backend 'auto' becomes the backend actually used (the run directory's
        config.yaml).

        Example:
            >>> parse_config(cfg.to_dict()) == cfg    # doctest: +SKIP
            True
        """
        autoft = self.autoft.to_dict()
        if resolve_backend:
            autoft["backend"] = self.resolved_backend()
        return {"name": self.name,
                "data": self.data.to_dict() if self.data is not None else None,
                "synthetic": self.synthetic.to_dict() if self.synthetic is not None else None,
                "model": self.model.to_dict(), "pretrain": self.pretrain.to_dict(),
                "finetune": self.finetune.to_dict(), "autoft": autoft,
                "strategies": list(self.strategies), "seeds": list(self.seeds),
                "targets": list(self.targets) if self.targets else None,
                "search": self.search.to_dict(),
                "run_dir": str(self.run_dir),
                "cache_dir": str(self.cache_dir) if self.cache_dir_given else None,
                "device": self.device}

    def training_dict(self) -> dict:
        """What a checkpoint depends on: every section but seeds, strategies and paths (a
        comparison may be extended with more seeds or strategies and resumed), with
        autoft.backend 'auto' resolved to the backend it picks.

        Example:
            >>> sorted(parse_config({"synthetic": {}}).training_dict())
            ['autoft', 'data', 'finetune', 'model', 'pretrain', 'synthetic']
        """
        # The backend actually used ('auto' resolved): a run folder's config.yaml records it
        # so, and a resume from that file is the same run.
        d = self.to_dict(resolve_backend=True)
        return {k: d[k] for k in ("data", "synthetic", "model", "pretrain", "finetune", "autoft")}

    def with_overrides(self, *, backend: str | None = None, seeds: int | None = None,
                       run_dir: str | Path | None = None, strategies: list | None = None,
                       device: str | None = None,
                       targets: list | None = None) -> "ExperimentConfig":
        """A copy with CLI overrides applied: `backend` replaces autoft.backend; `seeds=N`
        keeps the first N configured seeds and extends them with consecutive integers.

        Example:
            >>> parse_config({"synthetic": {}, "seeds": [3]}).with_overrides(seeds=3).seeds
            [3, 4, 5]
        """
        changes: dict[str, Any] = {}
        if backend is not None:
            changes["autoft"] = self.autoft.with_backend(backend)
        if seeds is not None:
            if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
                raise ConfigError(f"--seeds must be a positive integer, got {seeds!r}")
            base = list(self.seeds)
            while len(base) < seeds:
                base.append(max(base) + 1 if base else 0)
            changes["seeds"] = base[:seeds]
        if run_dir is not None:
            changes["run_dir"] = Path(run_dir).resolve()
            if not self.cache_dir_given:
                changes["cache_dir"] = changes["run_dir"] / "cache"
        if strategies is not None:
            changes["strategies"] = resolve_strategies(strategies)
            check_warmup(self.autoft, self.finetune, changes["strategies"])
        if device is not None:
            changes["device"] = _check_device(device, "--device")
        if targets is not None:
            changes["targets"] = _targets(targets, "--targets")
        return dataclasses.replace(self, **changes)

    def target_domains(self) -> list[str | None]:
        """The targets a comparison runs over: ``targets`` or, without it, ``[None]`` (the
        data's own target).

        Example:
            >>> parse_config({"synthetic": {}, "targets": ["a", "b"]}).target_domains()
            ['a', 'b']
        """
        return list(self.targets) if self.targets else [None]


def _targets(value, where: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        # "a, b" as --strategies reads it: the spaces around a comma are not part of a name.
        value = [v.strip() for v in value.split(",") if v.strip()]
    if (not isinstance(value, (list, tuple)) or not value
            or any(isinstance(v, bool) or not isinstance(v, (str, int)) for v in value)):
        raise ConfigError(f"{where} must be a non-empty list of domain values, got {value!r}")
    out = [str(v) for v in value]
    if len(set(out)) != len(out):
        raise ConfigError(f"{where} lists a domain twice: {out}")
    return out


def _section(cls, raw: dict, key: str):
    try:
        return cls.from_dict(raw.get(key), key)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:  # pragma: no cover - sections raise ConfigError
        raise ConfigError(str(e)) from None


def parse_config(raw: dict, base_dir: str | Path = ".", name: str = "experiment") -> ExperimentConfig:
    """Validate a config mapping (the parsed YAML) into an ExperimentConfig: each section
    becomes its typed object, once.

    Example:
        >>> parse_config({"synthetic": {}, "seeds": [0]}).seeds
        [0]
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"the config must be a YAML mapping, got {type(raw).__name__}")
    reject_unknown(raw, TOP_LEVEL_KEYS, "experiment")
    base_dir = Path(base_dir).resolve()
    name = raw.get("name", name)
    if not isinstance(name, str) or not name or "/" in name:
        raise ConfigError(f"name must be a non-empty string without '/', got {name!r}")

    data_raw = raw.get("data")
    if data_raw is None:
        data = None
    elif isinstance(data_raw, str):
        path = (base_dir / data_raw).resolve()
        data = DataConfig.from_dict(read_data_yaml(path), path.parent)
    elif isinstance(data_raw, dict):
        data = DataConfig.from_dict(data_raw, base_dir)
    else:
        raise ConfigError(f"data: must be a mapping or a path to a dataset YAML, got {data_raw!r}")
    synthetic = raw.get("synthetic")
    if synthetic is None and "synthetic" in raw and data_raw is None:
        synthetic = {}  # `synthetic:` with nothing under it: the defaults, as other sections
    if synthetic is not None:
        if not isinstance(synthetic, dict):
            raise ConfigError(f"synthetic: must be a mapping, got {synthetic!r}")
        synthetic = SyntheticConfig.from_dict(synthetic)
    if data is None and synthetic is None:
        raise ConfigError("the config needs a data: section or a synthetic: section")

    finetune = _section(TrainConfig, raw, "finetune")
    autoft = _section(AutoFTConfig, raw, "autoft")
    strategies = resolve_strategies(raw.get("strategies", "all"))
    check_warmup(autoft, finetune, strategies)
    run_dir = _path(raw.get("run_dir", "runs"), "run_dir")
    cache_raw = raw.get("cache_dir")
    cache_dir = _path(cache_raw, "cache_dir") if cache_raw is not None else run_dir / "cache"
    return ExperimentConfig(
        name=name, base_dir=base_dir, data=data, synthetic=synthetic,
        model=_section(ModelConfig, raw, "model"),
        pretrain=_section(PretrainConfig, raw, "pretrain"),
        finetune=finetune, autoft=autoft, strategies=strategies,
        seeds=_seeds(raw.get("seeds", [0, 1])), run_dir=run_dir, cache_dir=cache_dir,
        device=_check_device(raw.get("device", "auto"), "device"),
        targets=_targets(raw.get("targets"), "targets"),
        search=_section(SearchConfig, raw, "search"),
        cache_dir_given=cache_raw is not None)


def check_warmup(autoft: AutoFTConfig, finetune: TrainConfig, strategies) -> None:
    """A warm-up as long as the training leaves no epoch to choose the best from; and the
    frequency field policy with a held-out policy objective, where a field-gated strategy
    runs (see :func:`check_field_policy`)."""
    check_field_policy(autoft, strategies)
    gated = [s for s in strategies if STRATEGY_TABLE[s].has_policy]
    if gated and autoft.policy_warmup >= finetune.base_epochs:
        raise ConfigError(f"autoft.policy_warmup = {autoft.policy_warmup} is not below "
                          f"finetune.epochs = {finetune.base_epochs}: every epoch of {gated[0]} would "
                          f"be a warm-up epoch, which is never the best one, and its policy would "
                          f"never choose; give fewer warm-up epochs or more epochs")


def check_field_policy(autoft: AutoFTConfig, strategies) -> None:
    """field_policy: frequency trains on every target training row and chooses its threshold
    on validation: it does not combine with policy_objective: heldout in a strategy with
    field gates (autoft_field, autoft). autoft_layer has none, so it may use heldout."""
    fields = [s for s in strategies if STRATEGY_TABLE[s].field_policy]
    if fields and autoft.field_policy == "frequency" and autoft.policy_objective == "heldout":
        raise ConfigError(f"autoft: field_policy: frequency trains on every target training "
                          f"row and chooses its threshold on validation; it does not combine "
                          f"with policy_objective: heldout in {fields[0]} (set field_policy: "
                          f"network to train the policy network on a held-out slice, or run "
                          f"only autoft_layer, which has no field policy)")


def load_config(path: str | Path | None = None) -> ExperimentConfig:
    """Read and validate an experiment YAML; `None` loads the embedded demo config. A file
    with a ``fuxictr:`` section imports a FuxiCTR dataset/model config pair
    (:mod:`autoft_fast.config.fuxictr`; each key not applied is a FuxiCTRWarning).

    Example:
        >>> load_config(None).name
        'demo'
    """
    path = Path(path) if path is not None else DEMO_CONFIG
    raw = read_yaml_file(path, "config file", ConfigError)
    if raw is None:
        raise ConfigError(f"config file {str(path)!r} is empty")
    kind = looks_like_fuxictr(raw)
    if kind is not None:
        raise ConfigError(f"config file {str(path)!r} is a FuxiCTR {kind}; name it in the "
                          "fuxictr: section of an experiment file, with the domain split "
                          "(docs/fuxictr.md)")
    raw, notes = expand_fuxictr(raw, path.parent)  # a fuxictr: section -> our sections
    for msg in notes:
        warnings.warn(msg, FuxiCTRWarning, stacklevel=2)
    stem = path.name[:-5] if path.name.endswith(".yaml") else path.stem
    return parse_config(raw, path.parent, name=stem)


def load_fuxictr(dataset_config: str | Path, model_config: str | Path, experiment_id: str,
                 domain: dict, **kwargs) -> FuxiCTRImport:
    """A FuxiCTR dataset_config / model_config pair as a parsed experiment: ``.config`` (an
    ExperimentConfig), ``.experiment`` (its mapping) and ``.warnings`` (every key not
    applied). Keyword arguments (feature_map, root, overrides, warn) are those of
    :func:`autoft_fast.config.fuxictr.fuxictr_to_experiment`.

    Example::

        imp = load_fuxictr("config", "config", "DeepFM_test",
                           {"column": "pid", "source": ["a"], "target": "b"})
        imp.config.model.name          # 'deepfm'
    """
    imp = fuxictr_to_experiment(dataset_config, model_config, experiment_id, domain, **kwargs)
    imp.config = parse_config(imp.experiment, Path.cwd(),
                              name=str(imp.experiment.get("name", experiment_id)))
    return imp
