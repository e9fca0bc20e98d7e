"""The configuration layer: one validation helper for every section, typed objects parsed
once, the effective config written to the run directory, the strategy table."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from autoft_fast.config import (STRATEGY_TABLE, AutoFTConfig, ConfigError, DataConfig, DataError,
                                ExperimentConfig, ModelConfig, PretrainConfig, SyntheticConfig,
                                TrainConfig, parse_config, parse_section, setting)

TINY = {"n_source_rows": 400, "n_target_rows": 200}


@pytest.mark.parametrize("bad", ["5", True, float("nan"), float("inf"), None, [5]])
def test_tau_must_be_a_real_number(bad):
    with pytest.raises(ConfigError, match=r"autoft\.tau must be a finite number, got "):
        AutoFTConfig.from_dict({"tau": bad})


@pytest.mark.parametrize("cls, key, bad, needle", [
    (AutoFTConfig, "hard", "False", "autoft.hard must be true or false, got 'False'"),
    (TrainConfig, "epochs", 2.5, "train.epochs must be an integer, got 2.5"),
    (TrainConfig, "epochs", 0, "train.epochs must be >= 1, got 0"),  # source_only does that
    (TrainConfig, "lr", -1, "train.lr must be > 0, got -1"),
    (ModelConfig, "dropout", 1.0, "model.dropout must be >= 0 and < 1, got 1.0"),
    (ModelConfig, "hidden_units", [8, 0], "model.hidden_units[1] must be >= 1, got 0"),
    (AutoFTConfig, "anneal", "cos", "autoft.anneal must be one of ['none', 'exp', 'linear'], got 'cos'"),
])
def test_bad_values_name_section_key_and_value(cls, key, bad, needle):
    with pytest.raises(ConfigError) as e:
        cls.from_dict({key: bad})
    assert needle in str(e.value)


def test_unknown_keys_suggest_the_close_one_and_list_the_rest():
    with pytest.raises(ConfigError) as e:
        AutoFTConfig.from_dict({"tua": 1.0})
    msg = str(e.value)
    assert msg.startswith("unknown key 'tua' in autoft config; did you mean 'tau'? known keys: ")
    assert "policy_input" in msg and "l2sp_alpha" in msg
    with pytest.raises(ConfigError) as e:
        parse_config({"synthetic": {}, "modle": {}})
    assert "did you mean 'model'?" in str(e.value)
    with pytest.raises(DataError, match="did you mean 'n_source_rows'"):
        SyntheticConfig.from_dict({"n_sourec_rows": 5})
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict({"zzz": 1})
    assert "did you mean" not in str(e.value)


def test_a_new_key_is_one_declaration():
    @dataclass(frozen=True)
    class Section:
        policy_objective: str = setting("train", choices=("train", "heldout"),
                                        doc="what the policy steps on")
        policy_holdout: float = setting(0.2, minimum=0.0, maximum=1.0, max_open=True,
                                        doc="held-out share")

    assert parse_section(Section, None, "autoft") == Section()
    assert parse_section(Section, {"policy_objective": "heldout"}, "autoft").policy_objective == "heldout"
    with pytest.raises(ConfigError, match=r"autoft\.policy_holdout must be >= 0 and < 1, got 1"):
        parse_section(Section, {"policy_holdout": 1}, "autoft")
    with pytest.raises(ConfigError, match="did you mean 'policy_holdout'"):
        parse_section(Section, {"policy_holdot": 0.1}, "autoft")


def test_experiment_holds_parsed_sections(tmp_path):
    cfg = parse_config({"synthetic": TINY, "model": {"name": "DeepFM"},
                        "pretrain": {"seed": 4}, "autoft": {"tau": 2, "policy_lr": 0.01},
                        "run_dir": str(tmp_path)})
    assert isinstance(cfg, ExperimentConfig)
    assert isinstance(cfg.model, ModelConfig) and cfg.model.name == "deepfm"
    assert isinstance(cfg.autoft, AutoFTConfig) and cfg.autoft.policy_lr == 0.01
    assert isinstance(cfg.pretrain, PretrainConfig) and cfg.pretrain.seed == 4
    assert cfg.pretrain.epochs == 10 and cfg.finetune.base_epochs == 50  # the stages' own defaults
    assert cfg.finetune.epochs is None  # unset: 50, raised by cap_steps for a small target
    assert isinstance(cfg.synthetic, SyntheticConfig) and cfg.synthetic.n_target_rows == 200
    assert cfg.data is None
    # The effective config reads back to an equal config.
    again = parse_config(yaml.safe_load(yaml.safe_dump(cfg.to_dict())), cfg.base_dir, cfg.name)
    assert again == cfg
    over = cfg.with_overrides(backend="reference", seeds=3, run_dir=tmp_path / "other")
    assert over.autoft.backend == "reference" and over.seeds == [0, 1, 2]
    assert over.cache_dir == (tmp_path / "other" / "cache").resolve()
    assert cfg.autoft.backend == "auto"  # the original is untouched
    with pytest.raises(ConfigError, match="autoft.backend must be one of"):
        cfg.with_overrides(backend="gpu")


def test_data_path_is_parsed_once_at_load(tmp_path):
    (tmp_path / "clicks.csv").write_text("click,u,d\n1,a,s\n")
    (tmp_path / "dataset.yaml").write_text(yaml.safe_dump({"data": {
        "files": ["clicks.csv"], "label": "click", "categorical": ["u"],
        "domain": {"column": "d", "source": ["s"], "target": "t"}}}))
    cfg = parse_config({"data": "dataset.yaml"}, tmp_path)
    assert isinstance(cfg.data, DataConfig) and cfg.data.files == (tmp_path / "clicks.csv",)
    with pytest.raises(DataError, match="does not exist"):
        parse_config({"data": "missing.yaml"}, tmp_path)


def test_run_directory_holds_the_effective_config(tmp_path, capsys):
    import autoft_fast
    from autoft_fast.cli import main
    exp = tmp_path / "exp.yaml"
    exp.write_text(yaml.safe_dump({
        # (2,000 source rows: a 5 % source validation split of fewer holds no click at all)
        "synthetic": {**TINY, "seed": 1, "n_source_rows": 2000},
        "model": {"hidden_units": [8], "embedding_dim": 4},
        "pretrain": {"epochs": 1}, "finetune": {"epochs": 1}, "strategies": ["finetune_all"],
        "seeds": [0], "run_dir": str(tmp_path / "runs"), "device": "cpu"}))
    assert main(["compare", "--config", str(exp), "--no-progress"]) == 0
    run_dir = Path(capsys.readouterr().out.strip().splitlines()[-1].split(": ", 1)[1])
    written = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert written["autoft"]["backend"] == autoft_fast.available_backends("cpu")[0]
    assert written["autoft"]["tau"] == 5.0 and written["finetune"]["patience"] == 3  # defaults
    assert written["model"]["hidden_units"] == [8]
    assert parse_config(written, tmp_path).autoft.backend == written["autoft"]["backend"]


def test_strategy_table_rows():
    t = STRATEGY_TABLE
    assert t["target_only"].fresh and not t["target_only"].needs_pretrained
    assert not t["source_only"].trains
    assert t["freeze_dnn"].part("stack", "tune") == "frozen"
    assert t["autoft_layer"].part("embeddings", "tune") == "tuned"
    assert t["autoft_layer"].part("embeddings", "freeze") == "frozen"
    assert t["autoft"].field_policy and t["autoft"].layer_policy
    assert t["l2sp"].l2sp and not any(t[s].l2sp for s in t if s != "l2sp")
    with pytest.raises(ValueError, match="embeddings = 'melted'"):
        type(t["autoft"])("x", "melted", "tuned")


@pytest.mark.parametrize("value,advice", [(3, r"seeds: \[3\] for the one seed 3, or seeds: \[0, 1, 2\] for 3 seeds"),
                                          (0, r"seeds: \[0\] for the one seed 0, or a list such as")])
def test_a_bare_number_of_seeds_is_refused_not_read_as_one_seed(value, advice):
    # `--seeds 3` counts seeds; `seeds: 3` in the YAML used to mean the one seed 3.
    with pytest.raises(ConfigError, match=advice):
        parse_config({"synthetic": {}, "seeds": value})
    assert parse_config({"synthetic": {}, "seeds": [value]}).seeds == [value]


@pytest.mark.parametrize("grid,shown", [({"lr": [1e-3, 3e-3, 0.001]}, "0.001"),
                                        ({"tuned_budget": [1, 1.0]}, "1.0")])
def test_a_search_grid_listing_a_value_twice_is_refused(grid, shown):
    from autoft_fast.config import SearchConfig
    with pytest.raises(ConfigError, match=rf"search\.{next(iter(grid))} lists {shown} more than once"):
        parse_config({"synthetic": {}, "search": grid})
    assert SearchConfig.from_dict({"lr": [1e-3, 3e-3]}).lr == [1e-3, 3e-3]


@pytest.mark.parametrize("name", ["clicks.csv", "clicks.parquet", "train.gz"])
def test_a_data_file_given_as_the_data_section_says_what_data_takes(tmp_path, name):
    (tmp_path / name).write_text("user,click,domain\nu1,0,a\n")
    with pytest.raises(DataError, match=rf"data: '.*{name}' is a data file; data: takes a "
                                        rf"mapping that describes it .*files: \[{name}\]"):
        parse_config({"data": name}, tmp_path)
    (tmp_path / "d.yaml").write_text("- not a mapping\n")
    with pytest.raises(DataError, match="is not a YAML mapping"):
        parse_config({"data": "d.yaml"}, tmp_path)


@pytest.mark.parametrize("given,needs", [
    ({"policy_holdout": 0.5}, "policy_objective: heldout"),
    ({"policy_holdout_mode": "rotating"}, "policy_objective: heldout"),
    ({"tuned_budget_weight": 50.0}, "a tuned_budget"),
    ({"policy_warmup_gates": "tuned"}, "policy_warmup > 0"),
    ({"tau_min": 0.1}, "anneal: exp or linear"),
    ({"frequency_thresholds": [5.0], "field_policy": "network"}, "field_policy: frequency"),
    ({"sparse": True}, "embedding_optimizer: dense"),
])
def test_an_autoft_option_whose_setting_is_off_is_warned_about(given, needs):
    import warnings
    from autoft_fast.config import AutoFTConfig
    name = next(iter(given))
    with pytest.warns(UserWarning, match=rf"autoft\.{name} = .* has no effect without {needs}"):
        AutoFTConfig.from_dict(given)
    on = {"policy_holdout": {"policy_objective": "heldout"},
          "policy_holdout_mode": {"policy_objective": "heldout"},
          "tuned_budget_weight": {"tuned_budget": 0.5}, "policy_warmup_gates": {"policy_warmup": 1},
          "tau_min": {"anneal": "exp"}, "frequency_thresholds": {"field_policy": "frequency"},
          "sparse": {"embedding_optimizer": "dense"}}[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AutoFTConfig.from_dict({**given, **on})
        AutoFTConfig.from_dict({})  # defaults: nothing to say


@pytest.mark.parametrize("text, read_as", [("010", 8), ("1:30", 90), ("0b11", 3), ("0500", 320)])
def test_yaml_1_1_integer_forms_are_refused_with_both_readings(tmp_path, text, read_as):
    # PyYAML read `epochs: 010` as 8 and `1:30` as 90, silently.
    from autoft_fast.config import ConfigError, load_config
    path = tmp_path / "exp.yaml"
    path.write_text(f"synthetic: {{}}\nfinetune: {{epochs: {text}}}\n")
    with pytest.raises(ConfigError, match=rf"{text} is read by YAML 1.1 as the number {read_as}"
                                          rf".*quote it for text \('{text}'\) \(line 2"):
        load_config(path)


@pytest.mark.parametrize("text, value", [("10", 10), ("0", 0), ("0x10", 16), ("1_000", 1000),
                                         ("-5", -5)])
def test_plain_yaml_integers_still_read(text, value):
    from autoft_fast._io import load_yaml
    assert load_yaml(f"a: {text}") == {"a": value}
    assert load_yaml(f"a: '{text}'") == {"a": text}


def test_a_policy_learning_rate_of_zero_is_refused_as_finetune_lr_is():
    # It was accepted, and the policy never trained.
    from autoft_fast.config import AutoFTConfig, ConfigError
    with pytest.raises(ConfigError, match="autoft.policy_lr must be > 0, got 0"):
        AutoFTConfig.from_dict({"policy_lr": 0})
    assert AutoFTConfig.from_dict({"policy_lr": None}).policy_lr is None
