"""The ``model:``, ``autoft:``, ``pretrain:`` and ``finetune:`` sections, declared once.

Each key is one :func:`~autoft_fast.config.schema.setting` line (type, default, constraint,
doc); :meth:`from_dict` checks a YAML mapping against it and fills in the defaults.

Example:
    >>> AutoFTConfig.from_dict({"tau": 2}).tau
    2.0
"""
from __future__ import annotations

from dataclasses import MISSING, dataclass, replace

from ..modules import EMBEDDING_OPTIMIZERS
from ..ops.quant import FROZEN_DTYPES
from ..ops.registry import backend_names, check_backend_name
from .schema import ConfigError, parse_section, section_to_dict, setting

__all__ = ["ModelConfig", "AutoFTConfig", "TrainConfig", "PretrainConfig", "SearchConfig", "tau_at",
           "MODEL_NAMES", "ARCH_KEYS"]

MODEL_NAMES = ("dnn", "deepfm", "dcnv2")


def _backend(value, where, ctx):
    # The op's registry is the one list of backends (a backend registered later is valid too).
    try:
        return check_backend_name(value)
    except ValueError:
        raise ConfigError(f"{where} must be one of {list(backend_names())}, got {value!r}") from None

# The keys of model: that define the architecture: a pre-trained model and the config must
# agree on them. Dropout too: the copies keep the pre-trained model's modules, so a
# different value in the config would otherwise be silently ignored.
ARCH_KEYS = ("name", "embedding_dim", "hidden_units", "activation", "batch_norm", "dropout",
             "cross_layers", "structure")


def _lower(value, where, ctx):
    return value.lower() if isinstance(value, str) else value


class _Section:
    """Shared ``from_dict`` / ``to_dict`` of the sections in this module."""

    SECTION = "section"

    @classmethod
    def from_dict(cls, d: dict | None, section: str | None = None):
        """Check a YAML mapping and fill in defaults; ConfigError (a ValueError) names the key.

        Example:
            >>> ModelConfig.from_dict({"name": "dcnv2"}).cross_layers
            2
        """
        return parse_section(cls, d, section or cls.SECTION)

    def to_dict(self) -> dict:
        """Plain dict (YAML-safe); ``cls.from_dict(c.to_dict()) == c``."""
        return section_to_dict(self)


@dataclass(frozen=True)
class ModelConfig(_Section):
    """The base CTR model (``model:`` section). Defaults are small, FuxiCTR-like choices.

    Example::

        >>> ModelConfig.from_dict({"name": "dcnv2", "cross_layers": 3}).hidden_units
        [64, 32]
    """

    SECTION = "model"

    name: str = setting("dnn", choices=MODEL_NAMES, before=_lower, doc=(
        "dnn (embeddings + MLP), deepfm (first-order + FM + MLP over shared embeddings) or "
        "dcnv2 (cross network v2 + MLP)"))
    embedding_dim: int = setting(16, minimum=1, doc=(
        "one width for every field; the AutoFT papers' CTR setting"))
    hidden_units: list[int] = setting([64, 32], minimum=1, doc=(
        "the MLP widths; small enough that the demo runs in minutes on two cores. [] means no "
        "MLP (DCN-v2 is then cross network + output layer; DNN and DeepFM only the output "
        "layer on top of the embeddings)"))
    activation: str = setting("relu", choices=("relu", "gelu", "tanh", "sigmoid", "leaky_relu"),
                              doc="the MLP activation (FuxiCTR's default)")
    dropout: float = setting(0.0, minimum=0.0, maximum=1.0, max_open=True, doc=(
        "MLP dropout; off by default so a frozen layer and its tuned copy compute the same "
        "function at initialisation whatever the mode"))
    batch_norm: bool = setting(False, doc="batch norm in the MLP blocks (off, as dropout)")
    cross_layers: int = setting(2, minimum=0, doc=(
        "DCN-v2 cross layers (full-rank, x0 * (W x + b) + x)"))
    structure: str = setting("parallel", choices=("parallel", "stacked"), doc=(
        "DCN-v2 combination: parallel runs the cross network and the MLP side by side on the "
        "embeddings (DCN-v2's default), stacked feeds the cross network into the MLP"))
    embedding_init_std: float = setting(1e-4, minimum=0.0, doc=(
        "normal init std of embedding rows, FuxiCTR's default"))

    # Keys only one model reads: a DNN built with cross_layers 5 is the DNN built without.
    MODEL_ONLY_KEYS = {"cross_layers": "dcnv2", "structure": "dcnv2"}

    def arch_keys(self) -> tuple:
        """The ARCH_KEYS this model reads (DCN-v2's cross_layers and structure for dcnv2 only).

        Example:
            >>> ModelConfig.from_dict({"name": "dnn"}).arch_keys()[-1]
            'dropout'
        """
        return tuple(k for k in ARCH_KEYS if self.MODEL_ONLY_KEYS.get(k, self.name) == self.name)

    def used_dict(self) -> dict:
        """``to_dict()`` without the keys another model reads (what the model depends on).

        Example:
            >>> "cross_layers" in ModelConfig.from_dict({"name": "dnn"}).used_dict()
            False
        """
        return {k: v for k, v in self.to_dict().items()
                if self.MODEL_ONLY_KEYS.get(k, self.name) == self.name}

    def check(self, section: str) -> None:
        if self.name == "dcnv2" and self.cross_layers == 0 and not self.hidden_units:
            raise ConfigError(f"{section}: dcnv2 needs cross_layers > 0 or a non-empty "
                              "hidden_units")


def _refit_mode(value, where, ctx):
    """policy_refit's older boolean form: true = continue, false = none."""
    if isinstance(value, bool):
        return "continue" if value else "none"
    return value


@dataclass(frozen=True)
class AutoFTConfig(_Section):
    """Transfer settings (``autoft:`` section): the AutoFT policy and the L2-SP baseline.

    With hard gates the forward choice is tuned with probability sigmoid(logit1 - logit0)
    whatever ``tau``: the temperature only shapes the straight-through gradient.

    Example::

        >>> AutoFTConfig.from_dict({"anneal": "exp", "tau_min": 1.0}).tau_at(1.0)
        1.0
    """

    SECTION = "autoft"

    backend: str = setting("auto", after=_backend, doc=(
        "the gated-embedding backend of the field gates; auto = the first available for "
        "the device in the registry's order cpu, cuda, triton, reference (the run "
        "directory's config.yaml records the one used)"))
    sparse: bool = setting(False, doc=(
        "sparse (COO) gradients for the tuned embedding table (the trainer then uses "
        "SparseAdam for it); with embedding_optimizer: dense only (a fused table gets no "
        "gradient; warned about otherwise)"))
    embedding_optimizer: str = setting("fused_adam", choices=EMBEDDING_OPTIMIZERS, doc=(
        "how every trained feature-indexed table (the gated field table's tuned copy, the "
        "plain embedding and DeepFM first-order tables of every strategy) is trained: dense = "
        "by the trainer's optimizer (with `sparse`, SparseAdam for the gated table); "
        "fused_adam / fused_rowwise_adagrad / fused_sgd = updated inside the lookup's "
        "backward with the training lr (touched rows only, lazy state in the model's "
        "state_dict, no weight decay; l2sp's penalty is applied lazily to the touched rows). "
        "fused_adam: chosen on validation AUC over three synthetic settings "
        "(benchmarks/RESULTS.md, 'Embedding optimizer default')"))
    frozen_dtype: str = setting("float32", choices=tuple(FROZEN_DTYPES), doc=(
        "storage of the gated field table's frozen copy: float32, bfloat16, float16, or int8 "
        "(row-wise symmetric quantisation with a float16 scale per row, 0.28x the bytes at "
        "D = 16; dequantised inside the op's kernels); the tuned copy stays float32"))
    tau: float = setting(5.0, minimum=0.0, min_open=True, doc=(
        "Gumbel-softmax temperature; SpotTune's released code uses a fixed 5. A high "
        "temperature keeps the straight-through gradient y0 * y1 / tau alive for confident "
        "gates, so the policy can still change its mind late in training"))
    tau_min: float = setting(0.5, minimum=0.0, min_open=True,
                             doc="the temperature an annealed schedule ends at")
    anneal: str = setting("none", choices=("none", "exp", "linear"), doc=(
        "temperature schedule over training: exp: tau * (tau_min / tau) ** p, linear: "
        "tau + (tau_min - tau) * p, p in [0, 1] the training progress: epoch / (epochs - 1) "
        "over the configured finetune.epochs (50 when unset, also where cap_steps allows "
        "more: those epochs run at tau_min; see tau_at)"))
    hard: bool = setting(True, doc=(
        "one-hot gates in the forward pass (straight-through backward), so each instance "
        "really uses one path, as at inference"))
    eval_gates: str = setting("argmax", choices=("argmax", "sample"), doc=(
        "argmax: deterministic gates at evaluation; sample: drawn as in training (what "
        "SpotTune's test code does)"))
    tuned_penalty: float = setting(0.0, minimum=0.0, doc=(
        "weight of the mean fraction of tuned choices added to the loss (SpotTune's "
        "global-policy idea; the gate of an empty multi-hot bag chooses nothing and is not "
        "counted, as in policy_stats); 0 leaves the policy free"))
    policy_hidden_units: list[int] = setting([64], minimum=1, doc=(
        "the policy MLP over the instance's frozen embeddings"))
    policy_input: str = setting("frozen", choices=("frozen", "frozen+freq", "freq"), doc=(
        "what the policy sees: frozen = the instance's frozen (pre-trained) embeddings and "
        "dense values, detached, so the policy's input does not move while the tuned copy "
        "trains; freq = per field, the log-frequency of the instance's value in the source "
        "and in the target training rows (the signal the method's premise says decides reuse "
        "against re-learning); frozen+freq = both"))
    policy_objective: str = setting("train", choices=("train", "heldout"), doc=(
        "what the policy's steps minimise: train = the training loss on the same batches as "
        "the model (SpotTune's way; on those rows the tuned path is never worse, so it tends "
        "to learn 'always tuned'); heldout = first-order bi-level training as DARTS (Liu et "
        "al., 2019) trains its architecture weights: a seeded policy_holdout slice of the "
        "target training rows is never used for model weights, and the policy steps on its "
        "batches, alternating with the model's steps on the rest"))
    policy_holdout: float = setting(0.2, minimum=0.0, maximum=1.0, min_open=True,
                                    max_open=True, doc=(
        "with policy_objective: heldout, the fraction of target training rows kept for the "
        "policy's steps"))
    policy_holdout_mode: str = setting("fixed", choices=("fixed", "rotating"), doc=(
        "with policy_objective: heldout, fixed = one seeded slice for the whole training "
        "(never used for model weights); rotating = a fresh slice every epoch, so the model "
        "sees every row over the epochs and the policy is judged on rows that epoch's "
        "model steps did not fit (a cheaper cousin of cross-fitting)"))
    policy_refit: str = setting("none", choices=("none", "continue", "retrain"),
                                before=_refit_mode, doc=(
        "with policy_objective: heldout and the fixed slice, what follows the alternating "
        "training once early stopping ends it: none = nothing (the model never sees the "
        "held-out slice); continue = freeze the policy and continue training the model from "
        "that best on all target training rows, kept only where validation improves; "
        "retrain = freeze the policy found and train the model again from the pre-trained "
        "start on all target training rows under the policy's noise-free choices (also with "
        "eval_gates: sample, which then applies to evaluation only), early stopped as usual "
        "(DARTS's search-then-retrain, Liu et al. 2019). Both hold the temperature at the "
        "one the stage-one best was validated at (soft gates depend on it, hard ones do "
        "not). true / false are read as continue / none"))
    field_policy: str = setting("network", choices=("network", "frequency"), doc=(
        "what chooses the field gates of autoft and autoft_field: network = the policy "
        "network (Gumbel-softmax gates, trained as policy_objective says); frequency = the "
        "network, with the method's premise as a per-instance rule on top: a lookup whose "
        "value occurs at most k times in the target training rows (a bag: by its mean "
        "log(1 + count); an empty bag is not forced) takes the frozen row. The model is first trained with k = 0 (only "
        "values the target never saw are held frozen); k is then chosen among 0 and frequency_thresholds on validation "
        "AUC (model selection, as compare --tune does); with k > 0 the model is trained "
        "again from the pre-trained start under that rule and kept if its validation AUC is "
        "higher by DeLong's paired test (one-sided p < frequency_keep_p divided by the number "
        "of thresholds tried, Bonferroni). Layer gates stay with the network. network: "
        "chosen over five synthetic settings on a validation half that no run selected on "
        "(benchmarks/RESULTS.md, 'Policy learning defaults', run 9: frequency level with it); "
        "scored on the rows it selects on, frequency had looked better (runs 5-8)"))
    frequency_thresholds: list[float] = setting([10.0, 30.0, 100.0], minimum=0.0, doc=(
        "with field_policy: frequency, the thresholds k tried besides 0 (counts in the "
        "target training rows)"))
    frequency_select: str = setting("validation", choices=("validation", "crossfit"), doc=(
        "with field_policy: frequency, which rows choose k and test it: validation = the "
        "validation split (the k = 0 model with the rule applied to it, then the model "
        "retrained under the best k kept by the test of frequency_keep_p); crossfit = the "
        "target training rows, held out in turn: the training rows are split in two halves, "
        "a k = 0 model is trained on each half and scored with the rule at every k on the "
        "other half (each half's own counts), and the best k is kept when its pooled held-out "
        "AUC beats k = 0's by the same test; the model retrained under it is then kept without "
        "a validation test. Every training row is scored once, so the choice rests on several "
        "times the validation split's rows, at the cost of two more trainings on half the rows"))
    frequency_keep_p: float = setting(0.05, minimum=0.0, maximum=1.0, min_open=True, doc=(
        "with field_policy: frequency, the family-wise level of the one-sided test (DeLong's "
        "paired test of validation AUC against the k = 0 model) that keeps the model trained "
        "under the rule; the p-value must be below it divided by the number of thresholds "
        "tried (Bonferroni, since k was picked on the same rows). 1 with one threshold keeps "
        "the model whenever its validation AUC is higher"))
    policy_init_tuned: float = setting(0.5, minimum=0.0, maximum=1.0, min_open=True,
                                       max_open=True, doc=(
        "the untrained policy's probability of the tuned path on every gate (the bias of its "
        "last layer; its weights start at zero): 0.5 = fair coins; near 1 the AutoFT model "
        "starts as finetune_all with a few frozen draws (a Mixout-like regulariser, Lee et "
        "al. 2020) and turns a gate frozen only where the loss says so"))
    policy_warmup: int = setting(0, minimum=0, doc=(
        "epochs at the start in which the policy does not step: its gates keep the prior "
        "policy_init_tuned (fair coins by default), so the tuned copy trains under random mixing with "
        "the frozen one (a regulariser in the spirit of Mixout, Lee et al. 2020) before the "
        "policy chooses (with policy_warmup_gates: tuned, every gate is forced tuned instead); "
        "warm-up epochs are never the best epoch. 0 (no warm-up): chosen on validation AUC "
        "over four synthetic settings (benchmarks/RESULTS.md, 'Policy learning defaults')"))
    policy_warmup_gates: str = setting("random", choices=("random", "tuned"), doc=(
        "the gates during the warm-up: random (Gumbel draws at the policy's prior, "
        "policy_init_tuned: 50/50 by default) or tuned (forced)"))
    tuned_budget: float | None = setting(None, minimum=0.0, maximum=1.0, doc=(
        "a target for the fraction of tuned choices (SpotTune's global-policy idea as a "
        "budget): the loss gets tuned_budget_weight * max(0, fraction - tuned_budget); "
        "None: no budget"))
    tuned_budget_weight: float = setting(1.0, minimum=0.0, doc=(
        "weight of the penalty on the tuned fraction above tuned_budget"))
    ungated: str = setting("tune", choices=("tune", "freeze"), doc=(
        "the part a single-policy strategy does not gate (embeddings in autoft_layer, "
        "layers in autoft_field): tune fine-tunes it (SpotTune's choice), freeze keeps it "
        "at the pre-trained values"))
    l2sp_alpha: float = setting(0.01, minimum=0.0, doc=(
        "the l2sp strategy's penalty alpha / 2 * ||w - w_src||^2 over every trained "
        "parameter; 0.01 is the L2-SP paper's usual setting"))
    policy_lr: float | None = setting(None, minimum=0.0, min_open=True, doc=(
        "learning rate of the policy's own optimizer (None: finetune.lr)"))
    policy_weight_decay: float | None = setting(None, minimum=0.0, doc=(
        "weight decay of the policy's optimizer (None: finetune.weight_decay)"))

    def check(self, section: str) -> None:
        ks = list(self.frequency_thresholds)
        if len(set(ks)) != len(ks):
            raise ConfigError(f"{section}.frequency_thresholds lists a threshold twice ({ks}); "
                              "each one tried divides the keep test's level (Bonferroni)")
        if 0 in ks:
            raise ConfigError(f"{section}.frequency_thresholds: k = 0 is always tried (the "
                              f"model's own training); list thresholds above 0, got {ks}")
        if self.policy_refit != "none" and (self.policy_objective != "heldout"
                                            or self.policy_holdout_mode != "fixed"):
            raise ConfigError(f"{section}.policy_refit = {self.policy_refit!r} follows training "
                              "on a fixed held-out slice: it needs policy_objective: heldout with "
                              "policy_holdout_mode: fixed (the other settings train the model "
                              "on every training row already)")
        # field_policy: frequency with policy_objective: heldout is refused where a field-gated
        # strategy runs (experiment.check_warmup; the runner checks again): autoft_layer has
        # no field policy, and may train its layer policy on a held-out slice.
        self._warn_idle(section)

    # (option, the setting it needs, whether that setting is on): an option set away from its
    # default while the setting it belongs to is off changes nothing, which a user should hear.
    _IDLE_RULES = (
        ("policy_holdout", "policy_objective: heldout", lambda c: c.policy_objective == "heldout"),
        ("policy_holdout_mode", "policy_objective: heldout",
         lambda c: c.policy_objective == "heldout"),
        ("tuned_budget_weight", "a tuned_budget", lambda c: c.tuned_budget is not None),
        ("policy_warmup_gates", "policy_warmup > 0", lambda c: c.policy_warmup > 0),
        ("tau_min", "anneal: exp or linear", lambda c: c.anneal != "none"),
        ("frequency_thresholds", "field_policy: frequency",
         lambda c: c.field_policy == "frequency"),
        ("frequency_select", "field_policy: frequency", lambda c: c.field_policy == "frequency"),
        # A fused table gets no gradient at all: sparse or dense matters only to the dense rule.
        ("sparse", "embedding_optimizer: dense", lambda c: c.embedding_optimizer == "dense"),
    )

    def _warn_idle(self, section: str) -> None:
        import warnings
        fields = type(self).__dataclass_fields__
        for name, needs, on in self._IDLE_RULES:
            f = fields[name]
            default = f.default_factory() if f.default_factory is not MISSING else f.default
            if getattr(self, name) != default and not on(self):
                warnings.warn(f"{section}.{name} = {getattr(self, name)!r} has no effect without "
                              f"{needs}", UserWarning, stacklevel=4)

    def tau_at(self, progress: float) -> float:
        """The temperature at training progress ``progress`` in [0, 1] (0 = start, 1 = end).

        Example::

            >>> AutoFTConfig(tau=4.0, tau_min=1.0, anneal="linear").tau_at(0.5)
            2.5
        """
        return tau_at(self, progress)

    def with_backend(self, backend: str) -> "AutoFTConfig":
        """A copy with another (checked) backend.

        Example:
            >>> AutoFTConfig().with_backend("reference").backend
            'reference'
        """
        return AutoFTConfig.from_dict(dict(self.to_dict(), backend=backend))


def tau_at(cfg: AutoFTConfig | dict, progress: float) -> float:
    """Temperature of the ``autoft`` schedule at ``progress`` in [0, 1] (clamped).

    The trainer calls ``model.set_tau(tau_at(cfg, p))`` with p = epoch / (epochs - 1).
    Example::

        >>> tau_at({"tau": 5.0}, 0.7)
        5.0
        >>> round(tau_at({"tau": 4.0, "tau_min": 1.0, "anneal": "exp"}, 0.5), 6)
        2.0
    """
    if not isinstance(cfg, AutoFTConfig):
        cfg = AutoFTConfig.from_dict(cfg)
    if isinstance(progress, bool) or not isinstance(progress, (int, float)) \
            or progress != progress:
        raise ConfigError(f"tau_at: progress must be a number, got {progress!r}")
    p = min(max(float(progress), 0.0), 1.0)
    if cfg.anneal == "exp":
        return cfg.tau * (cfg.tau_min / cfg.tau) ** p
    if cfg.anneal == "linear":
        return cfg.tau + (cfg.tau_min - cfg.tau) * p
    return cfg.tau


@dataclass(frozen=True)
class TrainConfig(_Section):
    """Optimisation settings of one training stage (the ``finetune:`` section; ``pretrain:``
    is a :class:`PretrainConfig`).

    Example:
        >>> TrainConfig.from_dict({"lr": 0.002, "epochs": 3}, "finetune").epochs
        3
    """

    SECTION = "train"

    optimizer: str = setting("adam", choices=("adam", "adamw"),
                             doc="Adam or AdamW (FuxiCTR's usual CTR setting)")
    lr: float = setting(1e-3, minimum=0.0, min_open=True, doc="learning rate of the model")
    weight_decay: float = setting(0.0, minimum=0.0, doc=(
        "0: embedding tables are sparse-updated and decay would shrink unseen rows"))
    batch_size: int = setting(1024, minimum=1, doc="large batches keep the CPU kernels busy")
    eval_batch_size: int = setting(8192, minimum=1, doc="batch size of evaluation")
    epochs: int | None = setting(None, minimum=1, doc=(
        "at most this many epochs, a cap large enough that early stopping, not the cap, ends "
        "training (a run whose best epoch is the cap is warned about and counted in the "
        "report); unset (null): 50, or more where the target's epochs are too few steps to "
        "reach cap_steps; the same rule for every strategy (the source_only strategy "
        "evaluates the pre-trained model untrained)"))
    patience: int = setting(3, minimum=1, doc=(
        "stop after this many epochs without improvement of the monitored metric"))
    cap_steps: int = setting(500, minimum=0, doc=(
        "with epochs unset: the cap allows at least this many optimizer steps (batches), "
        "since a small target's epoch is a few steps and 50 of them can end its runs before "
        "they converge"))
    patience_steps: int = setting(50, minimum=0, doc=(
        "and only once at least this many optimizer steps (batches) have passed without "
        "improvement: patience counted in epochs alone can stop a small target's run within "
        "its first plateau"))
    monitor: str = setting("auc", choices=("auc", "logloss"),
                           doc="the validation metric early stopping watches")
    min_delta: float = setting(0.0, minimum=0.0, doc="the smallest change that counts as better")

    #: The cap when ``epochs`` is unset (before ``cap_steps`` raises it).
    DEFAULT_EPOCHS = 50

    @property
    def base_epochs(self) -> int:
        """``epochs``, or :attr:`DEFAULT_EPOCHS` when unset: the cap before ``cap_steps``.

        Example:
            >>> TrainConfig().base_epochs, TrainConfig(epochs=3).base_epochs
            (50, 3)
        """
        return self.DEFAULT_EPOCHS if self.epochs is None else int(self.epochs)

    def epoch_cap(self, steps_per_epoch: int) -> int:
        """The cap in epochs for a fit of ``steps_per_epoch`` optimizer steps an epoch:
        ``epochs`` when given; unset, 50 raised to allow ``cap_steps`` steps.

        Example:
            >>> TrainConfig(cap_steps=1000).epoch_cap(2), TrainConfig(epochs=5).epoch_cap(2)
            (500, 5)
        """
        if self.epochs is not None or self.cap_steps <= 0 or steps_per_epoch <= 0:
            return self.base_epochs
        return max(self.base_epochs, -(-int(self.cap_steps) // int(steps_per_epoch)))

    def with_epochs(self, epochs: int) -> "TrainConfig":
        """A copy that runs exactly ``epochs`` epochs (patience beyond them).

        Example:
            >>> TrainConfig().with_epochs(1).patience
            3
        """
        return replace(self, epochs=int(epochs), patience=max(self.patience, int(epochs) + 1),
                       cap_steps=0)


@dataclass(frozen=True)
class PretrainConfig(TrainConfig):
    """The ``pretrain:`` section: a TrainConfig with fewer epochs by default (the source
    set is large) and the pre-training seed.

    Example:
        >>> PretrainConfig.from_dict({"seed": 3}).epochs
        10
    """

    SECTION = "pretrain"

    epochs: int = setting(10, minimum=1, doc=(
        "the source set is large: few epochs suffice, and early stopping decides"))
    patience: int = setting(1, minimum=1, doc="stop after this many epochs without improvement")
    cap_steps: int = setting(0, minimum=0, doc=(
        "the source set is large (its epochs are many steps): no step floor on the cap"))
    patience_steps: int = setting(0, minimum=0, doc=(
        "the source set is large: patience in epochs alone"))
    seed: int = setting(0, minimum=0, doc="seed of the pre-training (model init and shuffling)")


@dataclass(frozen=True)
class SearchConfig(_Section):
    """The ``search:`` section: the small grid ``compare --tune`` gives every strategy.

    Each strategy is run for every combination of the grids that apply to it (``lr`` for all
    that train; ``l2sp_alpha`` for l2sp; ``policy_lr`` and ``tuned_budget`` for the autoft
    strategies), every seed; the setting with the best mean validation AUC over the seeds is
    picked, and the table reports the test metrics of the picked setting's runs. Every
    strategy gets the same learning-rate grid and the same grid of each setting it shares;
    the number of settings is not the same (defaults: 3 for finetune_all and the other
    lr-only strategies, 9 for l2sp, 12 for each autoft strategy), and more settings picked
    on the same validation rows favour the strategy with more of them by selection alone,
    so read a small gain of a strategy with a larger grid with that in mind.

    Example::

        >>> SearchConfig.from_dict({"lr": [0.001, 0.003]}).lr
        [0.001, 0.003]
    """

    SECTION = "search"

    lr: list[float] = setting([3e-4, 1e-3, 3e-3], minimum=0.0, min_open=True, doc=(
        "fine-tuning learning rates tried for every strategy that trains"))
    l2sp_alpha: list[float] = setting([1e-3, 1e-2, 1e-1], minimum=0.0, doc=(
        "L2-SP penalty weights tried for l2sp"))
    policy_lr: list[float] = setting([1e-3, 1e-2], minimum=0.0, min_open=True, doc=(
        "policy learning rates tried for the autoft strategies"))
    tuned_budget: list[float] = setting([1.0, 0.5], minimum=0.0, maximum=1.0, doc=(
        "tuned-fraction budgets tried for the autoft strategies (1.0: no budget)"))

    def check(self, section: str) -> None:
        for name in ("lr", "l2sp_alpha", "policy_lr", "tuned_budget"):
            values = getattr(self, name)
            if not values:
                raise ConfigError(f"{section}.{name} must list at least one value")
            twice = sorted({v for v in values if values.count(v) > 1})
            if twice:  # the same setting would be trained again for nothing
                raise ConfigError(f"{section}.{name} lists {twice[0]!r} more than once: "
                                  f"{values!r}")
