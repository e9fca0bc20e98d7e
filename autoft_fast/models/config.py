"""The ``model:`` and ``autoft:`` sections of an experiment file, with their defaults.

Both are read from plain dicts (the parsed YAML) and checked once, here, so a typo or a bad
value fails at start-up with a message that names the key, not deep inside a training step.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

MODEL_NAMES = ("dnn", "deepfm", "dcnv2")
DCN_STRUCTURES = ("parallel", "stacked")
ANNEAL_MODES = ("none", "exp", "linear")
EVAL_GATES = ("argmax", "sample")
UNGATED_MODES = ("tune", "freeze")
BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")


def _unknown_keys(section: str, given: dict, known: set[str]) -> None:
    unknown = sorted(set(given) - known)
    if unknown:
        raise ValueError(f"{section}: unknown key(s) {unknown}; known keys: {sorted(known)}")


def _check_int_list(section: str, key: str, value) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        raise ValueError(f"{section}.{key} = {value!r} must be a list of positive integers")
    return list(value)


def _check_number(section: str, key: str, value, *, low=None, high=None, low_open=False,
                  high_open=False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{section}.{key} = {value!r} must be a finite number")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{section}.{key} = {value!r} must be {'>' if low_open else '>='} {low}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ValueError(f"{section}.{key} = {value!r} must be {'<' if high_open else '<='} {high}")
    return float(value)


def _check_choice(section: str, key: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{section}.{key} = {value!r} is not one of {list(choices)}")
    return value


@dataclass
class ModelConfig:
    """The base CTR model (``model:`` section). Defaults are small, FuxiCTR-like choices.

    - ``name``: ``dnn`` (embeddings + MLP), ``deepfm`` (first-order + FM + MLP over shared
      embeddings) or ``dcnv2`` (cross network v2 + MLP).
    - ``embedding_dim`` (16): one width for every field; the AutoFT papers' CTR setting.
    - ``hidden_units`` ([64, 32]): the MLP; small enough that the demo runs in minutes on
      two cores. ``[]`` means no MLP (DCN-v2 then is cross network + output layer only;
      DNN and DeepFM then have only the output layer on top of the embeddings).
    - ``activation`` (``relu``), ``dropout`` (0.0), ``batch_norm`` (False): FuxiCTR's
      defaults; dropout and batch norm are off so a frozen layer and its tuned copy compute
      the same function at initialisation whatever the mode.
    - ``cross_layers`` (2): DCN-v2 cross layers (full-rank, x0 * (W x + b) + x).
    - ``structure`` (``parallel``): DCN-v2 combination; ``parallel`` runs the cross network
      and the MLP side by side on the embeddings and concatenates their outputs (DCN-v2's
      default), ``stacked`` feeds the cross network's output into the MLP.
    - ``embedding_init_std`` (1e-4): normal init of embedding rows, FuxiCTR's default.

    Example::

        >>> ModelConfig.from_dict({"name": "dcnv2", "cross_layers": 3}).hidden_units
        [64, 32]
    """

    name: str = "dnn"
    embedding_dim: int = 16
    hidden_units: list[int] = field(default_factory=lambda: [64, 32])
    activation: str = "relu"
    dropout: float = 0.0
    batch_norm: bool = False
    cross_layers: int = 2
    structure: str = "parallel"
    embedding_init_std: float = 1e-4

    @classmethod
    def from_dict(cls, d: dict | None) -> "ModelConfig":
        """Check a ``model:`` dict and fill in defaults; raises ValueError naming the key."""
        d = dict(d or {})
        _unknown_keys("model", d, {f.name for f in fields(cls)})
        cfg = cls(**d)
        cfg.name = _check_choice("model", "name", str(cfg.name).lower(), MODEL_NAMES)
        if not isinstance(cfg.embedding_dim, int) or isinstance(cfg.embedding_dim, bool) \
                or cfg.embedding_dim < 1:
            raise ValueError(f"model.embedding_dim = {cfg.embedding_dim!r} must be a positive integer")
        cfg.hidden_units = [] if cfg.hidden_units in (None, []) else \
            _check_int_list("model", "hidden_units", cfg.hidden_units)
        cfg.activation = _check_choice("model", "activation", cfg.activation,
                                       ("relu", "gelu", "tanh", "sigmoid", "leaky_relu"))
        cfg.dropout = _check_number("model", "dropout", cfg.dropout, low=0.0, high=1.0,
                                    high_open=True)
        if not isinstance(cfg.batch_norm, bool):
            raise ValueError(f"model.batch_norm = {cfg.batch_norm!r} must be true or false")
        if not isinstance(cfg.cross_layers, int) or isinstance(cfg.cross_layers, bool) \
                or cfg.cross_layers < 0:
            raise ValueError(f"model.cross_layers = {cfg.cross_layers!r} must be an integer >= 0")
        cfg.structure = _check_choice("model", "structure", cfg.structure, DCN_STRUCTURES)
        cfg.embedding_init_std = _check_number("model", "embedding_init_std",
                                               cfg.embedding_init_std, low=0.0)
        if cfg.name == "dcnv2" and cfg.cross_layers == 0 and not cfg.hidden_units:
            raise ValueError("model: dcnv2 needs cross_layers > 0 or a non-empty hidden_units")
        return cfg

    def to_dict(self) -> dict:
        """Plain dict (YAML-safe); ``ModelConfig.from_dict(c.to_dict()) == c``."""
        return asdict(self)


@dataclass
class AutoFTConfig:
    """Transfer settings (``autoft:`` section): the AutoFT policy and the L2-SP baseline.

    - ``backend`` (``auto``): the gated-embedding backend for field gates.
    - ``sparse`` (False): sparse (COO) gradients for the tuned embedding table; needs an
      optimizer that takes them (SparseAdam), so off by default.
    - ``tau`` (5.0): Gumbel-softmax temperature; SpotTune's released code uses a fixed 5.
      A high temperature keeps the straight-through gradient y0 * y1 / tau alive for
      confident gates, so the policy can still change its mind late in training.
    - ``anneal`` (``none``), ``tau_min`` (0.5): temperature schedule over training,
      ``exp``: tau * (tau_min / tau) ** p, ``linear``: tau + (tau_min - tau) * p, with p in
      [0, 1] the training progress (see :func:`tau_at`). Fixed by default, as SpotTune.
    - ``hard`` (True): one-hot gates in the forward pass (straight-through backward), so
      each instance really uses one path, as at inference. With hard gates the forward
      choice is tuned with probability sigmoid(logit1 - logit0) whatever ``tau``: the
      temperature only shapes the straight-through gradient (and the soft gates).
    - ``eval_gates`` (``argmax``): deterministic gates at evaluation (reproducible metrics);
      ``sample`` draws them as in training (what SpotTune's test code does).
    - ``tuned_penalty`` (0.0): weight of the mean fraction of tuned choices added to the
      loss (SpotTune's global-policy idea); 0 leaves the policy free, as the method's default.
    - ``policy_hidden_units`` ([64]): the policy MLP over the instance's frozen
      embeddings; one hidden layer, small next to the CTR model it routes.
    - ``policy_input`` (``frozen``): what the policy sees; ``frozen`` = the instance's
      frozen (pre-trained) embeddings and dense values, detached, so the policy's input does
      not move while the tuned copy trains.
    - ``ungated`` (``tune``): what happens to the part a single-policy strategy does not
      gate (the embeddings in ``autoft_layer``, the layers in ``autoft_field``): ``tune``
      fine-tunes it (SpotTune's choice for what its policy does not route), ``freeze``
      keeps it at the pre-trained values.
    - ``l2sp_alpha`` (0.01): the ``l2sp`` strategy's penalty alpha / 2 * ||w - w_src||^2
      summed over every trained parameter; 0.01 is the L2-SP paper's usual setting for the
      pre-trained part; scale it with the data.
    - ``policy_lr``, ``policy_weight_decay``: read by the trainer (the policy has its own
      optimizer); accepted here so one section holds every AutoFT setting.

    Example::

        >>> AutoFTConfig.from_dict({"anneal": "exp", "tau_min": 1.0}).tau_at(1.0)
        1.0
    """

    backend: str = "auto"
    sparse: bool = False
    tau: float = 5.0
    tau_min: float = 0.5
    anneal: str = "none"
    hard: bool = True
    eval_gates: str = "argmax"
    tuned_penalty: float = 0.0
    policy_hidden_units: list[int] = field(default_factory=lambda: [64])
    policy_input: str = "frozen"
    ungated: str = "tune"
    l2sp_alpha: float = 0.01
    policy_lr: float | None = None
    policy_weight_decay: float | None = None

    @classmethod
    def from_dict(cls, d: dict | None) -> "AutoFTConfig":
        """Check an ``autoft:`` dict and fill in defaults; raises ValueError naming the key."""
        d = dict(d or {})
        _unknown_keys("autoft", d, {f.name for f in fields(cls)})
        cfg = cls(**d)
        cfg.backend = _check_choice("autoft", "backend", cfg.backend, BACKENDS)
        for key in ("sparse", "hard"):
            if not isinstance(getattr(cfg, key), bool):
                raise ValueError(f"autoft.{key} = {getattr(cfg, key)!r} must be true or false")
        cfg.tau = _check_number("autoft", "tau", cfg.tau, low=0.0, low_open=True)
        cfg.tau_min = _check_number("autoft", "tau_min", cfg.tau_min, low=0.0, low_open=True)
        cfg.anneal = _check_choice("autoft", "anneal", cfg.anneal, ANNEAL_MODES)
        cfg.eval_gates = _check_choice("autoft", "eval_gates", cfg.eval_gates, EVAL_GATES)
        cfg.tuned_penalty = _check_number("autoft", "tuned_penalty", cfg.tuned_penalty, low=0.0)
        cfg.policy_hidden_units = [] if cfg.policy_hidden_units in (None, []) else \
            _check_int_list("autoft", "policy_hidden_units", cfg.policy_hidden_units)
        cfg.policy_input = _check_choice("autoft", "policy_input", cfg.policy_input, ("frozen",))
        cfg.ungated = _check_choice("autoft", "ungated", cfg.ungated, UNGATED_MODES)
        cfg.l2sp_alpha = _check_number("autoft", "l2sp_alpha", cfg.l2sp_alpha, low=0.0)
        for key in ("policy_lr", "policy_weight_decay"):
            if getattr(cfg, key) is not None:
                setattr(cfg, key, _check_number("autoft", key, getattr(cfg, key), low=0.0))
        return cfg

    def to_dict(self) -> dict:
        """Plain dict (YAML-safe); ``AutoFTConfig.from_dict(c.to_dict()) == c``."""
        return asdict(self)

    def tau_at(self, progress: float) -> float:
        """The temperature at training progress ``progress`` in [0, 1] (0 = start, 1 = end).

        Example::

            >>> AutoFTConfig(tau=4.0, tau_min=1.0, anneal="linear").tau_at(0.5)
            2.5
        """
        return tau_at(self, progress)


def tau_at(cfg: AutoFTConfig | dict, progress: float) -> float:
    """Temperature of the ``autoft`` schedule at ``progress`` in [0, 1] (clamped).

    The trainer calls ``model.set_tau(tau_at(cfg, p))`` with p = step / (total steps - 1)
    or epoch / (epochs - 1). Example::

        >>> tau_at({"tau": 5.0}, 0.7)
        5.0
        >>> round(tau_at({"tau": 4.0, "tau_min": 1.0, "anneal": "exp"}, 0.5), 6)
        2.0
    """
    if not isinstance(cfg, AutoFTConfig):
        cfg = AutoFTConfig.from_dict(cfg)
    p = _check_number("tau_at", "progress", progress)
    p = min(max(p, 0.0), 1.0)
    if cfg.anneal == "exp":
        return cfg.tau * (cfg.tau_min / cfg.tau) ** p
    if cfg.anneal == "linear":
        return cfg.tau + (cfg.tau_min - cfg.tau) * p
    return cfg.tau
