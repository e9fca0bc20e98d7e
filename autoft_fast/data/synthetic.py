"""A synthetic multi-domain CTR data set in which the choice AutoFT makes matters.

Designed from the method's premise, before any model was trained on it (and not tuned
afterwards). The premise (AutoFT, arXiv 2106.04873; docs/models.md): a model pre-trained on large source domains
is adapted to a small target domain; some of what it learnt transfers, some does not, and
which is which differs per field and per instance. The generator builds exactly that world,
with a known ground truth, so that each effect can be switched off to check what it does.

Design, and why each part is there
----------------------------------
* Domains. Three source domains (``src_a``/``src_b``/``src_c``, 50/30/20 % of 300k rows) and
  one target (``tgt``, 30k rows, a tenth of the source). Large source / small target is the
  setting of the paper; several source domains make the ``domain`` column a real one.
* Ground truth: an FM-like logit per row of domain ``d``:
  ``b_d + s_main * sum_f w_{f,d}[x_f] + s_int * sum_{f<g} <v_{f,d}[x_f], v_{g,d}[x_g]>``
  with ``latent_dim``-dimensional vectors: per-field main effects plus pairwise
  interactions, the structure the base CTR models (DNN, DeepFM, DCN-v2) are built to learn.
  ``s_main`` and ``s_int`` are set so that, on source rows, the two sums have standard
  deviation ``main_effect_std`` and ``interaction_std`` (0.6 each: a logit spread of about
  0.85, which gives an oracle AUC in the 0.7-0.8 band typical of real CTR data rather than
  an easy, separable problem). Labels are Bernoulli draws of ``sigmoid(logit)``.
* Base CTR. ``b_d`` is solved (bisection) so that domain ``d``'s mean click probability is
  its configured CTR: 10 %, 8 %, 14 % for the sources, 6 % for the target, inside the
  5-20 % band of display advertising, and different per domain so the output bias has to
  move too.
* Fields (13: eleven categorical, one numeric, one multi-hot), a 2 x 2 design of
  effect {stable, shifted} x frequency {same, shifted}:

  ===========  =====  =====  =======  =========
  field        card.  Zipf   effect   frequency
  ===========  =====  =====  =======  =========
  user_id      4000   1.1    stable   shifted
  item_id      2000   1.1    shifted  shifted
  brand        300    1.0    shifted  same
  category     50     0.9    stable   same
  site_id      200    1.0    shifted  shifted
  app_id       500    1.05   stable   shifted
  device       8      1.2    stable   same
  os           4      1.0    stable   same
  hour         24     0.2    shifted  same
  slot         6      0.8    stable   same
  region       30     0.8    shifted  same
  price        num.   -      stable   shifted (log-normal mean +0.5 in the target)
  tags         300    1.0    shifted  shifted (multi-hot, 0-6 tags per row)
  ===========  =====  =====  =======  =========

  - *Stable* effect: ``w`` and ``v`` are identical in every domain, so the pre-trained
    parameters are right for the target and re-learning them from 18k rows only adds noise.
  - *Shifted* effect: the target's parameters are ``rho * base + sqrt(1 - rho^2) * fresh``
    with ``rho = shift_corr = 0.3``: partly related (transfer still helps as a starting
    point), mostly new (the frozen copy is wrong). Each source domain is also a mix with
    ``rho = source_shift_corr = 0.9``, so the sources differ a little among themselves, as
    real source domains do.
  - *Zipf* frequencies (``p(rank r) ~ (r+1)^-a``): a few ids are common, most are rare, as in
    real id features; this is what makes per-instance decisions differ (a common id's row is
    well estimated, a rare one's is not).
  - *Frequency shift*: the target draws its ids through a random permutation of the ranks,
    so ids that are common in the target are mostly rare (or absent) in the source. For such
    an id the pre-trained row was barely trained even when the field's effect is stable;
    for a common-in-both id of a stable field the pre-trained row is the best estimate.
    Hence the best choice (frozen or tuned) differs per field (stable vs shifted) and per
    instance (is this row's id frequent in the source?), which is AutoFT's premise.
  - ``price`` (numeric, bucketised by the pipeline) enters through ``tanh`` of its
    standardised log, a smooth non-linear effect that buckets can learn; its distribution
    moves up in the target, so the target fills buckets the source used little.
  - ``tags`` (multi-hot) enters through the mean of its tags' parameters; some rows have no
    tags, so the pipeline's empty-slot padding is exercised.
* A ``ts`` column (seconds, 14 days, rows in time order) lets the time split be used; time
  has no effect on clicks, so a time split and a random split see the same distribution.
* Determinism: parameters come from one child of ``SeedSequence(seed)`` and rows from
  another, so the same seed gives byte-identical files; changing the row counts does not
  change the ground-truth parameters.

Files written by :func:`generate_synthetic`: the data (``synthetic.csv`` or
``synthetic.parquet``), ``dataset.yaml`` (a ``data:`` section ready for
:func:`~autoft_fast.data.load_data_config`) and ``ground_truth.json`` (the generator's
config, the scales and biases, each domain's CTR and the oracle AUC / LogLoss obtained with
the true click probabilities: the ceiling any model can reach).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import yaml

from .._io import strict_json
from ..config.data import DataError
from ..config.synthetic import DEFAULT_FIELDS, SyntheticConfig, SyntheticField

log = logging.getLogger("autoft_fast.data")

# ---------------------------------------------------------------------------- ground truth
@dataclass
class GroundTruth:
    """The generator's true parameters. ``main[f][d]`` is field ``f``'s main-effect table in
    domain ``d`` ([cardinality], or [1] for a numeric field: the coefficient of tanh(z)),
    ``latent[f][d]`` its latent table ([cardinality, k] or [1, k]); ``rank_to_id[f][d]``
    maps a popularity rank to an id in domain ``d``."""

    domains: list[str]
    main: dict[str, list[np.ndarray]]
    latent: dict[str, list[np.ndarray]]
    rank_to_id: dict[str, list[np.ndarray]]
    scale_main: float = 1.0
    scale_interaction: float = 1.0
    bias: list[float] = field(default_factory=list)


def _mix(base: np.ndarray, rho: float, rng: np.random.Generator) -> np.ndarray:
    # Same marginal variance as `base`, correlation `rho` with it.
    return rho * base + np.sqrt(max(0.0, 1.0 - rho * rho)) * rng.standard_normal(base.shape)


def _ground_truth(cfg: SyntheticConfig, rng: np.random.Generator) -> GroundTruth:
    domains = [*cfg.source_domains, cfg.target_domain, *cfg.extra_targets]
    n_src = len(cfg.source_domains)
    n_tgt = len(domains) - n_src
    k = cfg.latent_dim
    main, latent, rank_to_id = {}, {}, {}
    for f in cfg.fields:
        c = 1 if f.kind == "numeric" else f.cardinality
        w0 = rng.standard_normal(c)
        # Unit variance everywhere (the overall scale is set later from the source rows):
        # `_mix` keeps the variance only if the fresh part has the base's variance.
        v0 = rng.standard_normal((c, k))
        ws, vs = [], []
        for d in range(len(domains)):
            if f.effect == "stable":
                ws.append(w0)
                vs.append(v0)
            else:
                rho = cfg.source_shift_corr if d < n_src else cfg.shift_corr
                ws.append(_mix(w0, rho, rng))
                vs.append(_mix(v0, rho, rng))
        main[f.name], latent[f.name] = ws, vs
        identity = np.arange(c)
        shifted = f.frequency == "shifted" and f.kind != "numeric"
        # Each target domain draws its own popularity order (one permutation per target).
        rank_to_id[f.name] = [identity] * n_src + [
            rng.permutation(c) if shifted else identity for _ in range(n_tgt)]
    return GroundTruth(domains=domains, main=main, latent=latent, rank_to_id=rank_to_id)


def _zipf_probs(c: int, a: float) -> np.ndarray:
    p = (np.arange(c) + 1.0) ** (-float(a))
    return p / p.sum()


# ---------------------------------------------------------------------------- rows
def _domain_sizes(cfg: SyntheticConfig) -> list[int]:
    w = np.asarray(cfg.source_weights, dtype=np.float64)
    sizes = np.floor(cfg.n_source_rows * w / w.sum()).astype(int)
    sizes[0] += cfg.n_source_rows - sizes.sum()
    return [*sizes.tolist(), *[cfg.n_target_rows] * (1 + len(cfg.extra_targets))]


def build_synthetic(cfg: SyntheticConfig) -> tuple[pd.DataFrame, GroundTruth, np.ndarray]:
    """Generate the rows in memory: (frame as written to disk, ground truth, true click
    probability of every row). Deterministic from ``cfg.seed``.

    Example::

        frame, truth, p = build_synthetic(SyntheticConfig(n_source_rows=1000, n_target_rows=100))
    """
    # A config built in code (not from YAML) is checked here, as from_dict checks YAML.
    cfg = SyntheticConfig.from_dict(cfg.to_dict())
    param_seq, row_seq = np.random.SeedSequence(cfg.seed).spawn(2)
    truth = _ground_truth(cfg, np.random.Generator(np.random.PCG64(param_seq)))
    rng = np.random.Generator(np.random.PCG64(row_seq))
    sizes = _domain_sizes(cfg)
    n = sum(sizes)
    dom = np.repeat(np.arange(len(sizes)), sizes)
    # Rows are generated domain by domain (contiguous blocks, slices are cheaper than masks);
    # they are put in time order at the end.
    ends = np.cumsum(sizes)
    blocks = [slice(int(e - s), int(e)) for s, e in zip(sizes, ends)]
    n_src = len(cfg.source_domains)
    k = cfg.latent_dim

    main = np.zeros(n)
    vsum = np.zeros((n, k))      # sum of the rows' field vectors
    vsq = np.zeros(n)            # sum of their squared norms: FM pairs = (|sum|^2 - sum |v|^2) / 2
    columns: dict[str, Any] = {}
    for f in cfg.fields:
        if f.kind == "numeric":
            mu = np.where(dom >= n_src, 3.0 + (cfg.price_shift if f.frequency == "shifted" else 0.0), 3.0)
            price = np.round(np.exp(mu + 0.8 * rng.standard_normal(n)), 2)
            price = np.maximum(price, 0.01)
            g = np.tanh((np.log(price) - 3.0) / 0.8)
            columns[f.name] = price
            for d in range(len(sizes)):
                m = blocks[d]
                main[m] += truth.main[f.name][d][0] * g[m]
                v = g[m, None] * truth.latent[f.name][d][0][None, :]
                vsum[m] += v
                vsq[m] += (v * v).sum(1)
            continue
        p = _zipf_probs(f.cardinality, f.zipf)
        if f.kind == "categorical":
            ranks = rng.choice(f.cardinality, size=n, p=p)
            ids = np.empty(n, dtype=np.int64)
            for d in range(len(sizes)):
                m = blocks[d]
                ids[m] = truth.rank_to_id[f.name][d][ranks[m]]
                main[m] += truth.main[f.name][d][ids[m]]
                v = truth.latent[f.name][d][ids[m]]
                vsum[m] += v
                vsq[m] += (v * v).sum(1)
            columns[f.name] = ids
        else:  # multihot
            length = np.minimum(rng.poisson(f.mean_len, size=n), f.max_len)
            ranks = rng.choice(f.cardinality, size=(n, f.max_len), p=p)
            tags = np.empty_like(ranks)
            for d in range(len(sizes)):
                m = blocks[d]
                tags[m] = truth.rank_to_id[f.name][d][ranks[m]]
            sentinel = f.cardinality
            tags[np.arange(f.max_len)[None, :] >= length[:, None]] = sentinel
            tags.sort(axis=1)
            valid = tags < sentinel
            valid[:, 1:] &= tags[:, 1:] != tags[:, :-1]  # a tag listed twice counts once
            count = valid.sum(1)
            safe = np.where(valid, tags, 0)
            for d in range(len(sizes)):
                m = blocks[d]
                wt = truth.main[f.name][d][safe[m]] * valid[m]
                vt = truth.latent[f.name][d][safe[m]] * valid[m][:, :, None]
                denom = np.maximum(count[m], 1)
                main[m] += wt.sum(1) / denom
                v = vt.sum(1) / denom[:, None]
                vsum[m] += v
                vsq[m] += (v * v).sum(1)
            columns[f.name] = _join_tags(tags, valid)

    inter = 0.5 * ((vsum * vsum).sum(1) - vsq)
    src = dom < n_src
    # Scales from the source rows, applied to every domain: the target's spread then reflects
    # its own (shifted) parameters rather than being forced equal.
    if main[src].std() < 1e-9:
        raise DataError("synthetic: the fields' values hardly vary over the source rows (a "
                        "zipf far above 1 puts nearly every row on one id, a cardinality of "
                        "1 has one value), so no click model can be scaled to "
                        "main_effect_std; lower zipf or raise the cardinalities")
    truth.scale_main = float(cfg.main_effect_std / max(main[src].std(), 1e-12))
    truth.scale_interaction = float(cfg.interaction_std / max(inter[src].std(), 1e-12))
    logit = truth.scale_main * main + truth.scale_interaction * inter
    ctrs = [*cfg.source_ctr, *[cfg.target_ctr] * (1 + len(cfg.extra_targets))]
    truth.bias = [_solve_bias(logit[dom == d], ctrs[d]) for d in range(len(sizes))]
    logit = logit + np.asarray(truth.bias)[dom]
    prob = 1.0 / (1.0 + np.exp(-logit))
    click = (rng.random(n) < prob).astype(np.int64)

    start = 1_704_067_200  # 2024-01-01 00:00:00 UTC
    ts = start + np.floor(rng.random(n) * cfg.days * 86_400).astype(np.int64)
    order = np.argsort(ts, kind="stable")
    frame = pd.DataFrame({
        "ts": ts,
        "domain": np.asarray(truth.domains, dtype=object)[dom],
        "click": click,
        **columns,
    }).iloc[order].reset_index(drop=True)
    return frame, truth, prob[order]


def _join_tags(tags: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """[N, L] tag ids + mask -> "3|17|250" strings, vectorised (no per-row Python)."""
    offsets = np.concatenate([[0], np.cumsum(valid.sum(1))]).astype(np.int32)
    values = pc.cast(pa.array(tags[valid]), pa.string())
    return pc.binary_join(pa.ListArray.from_arrays(pa.array(offsets), values), "|").to_numpy(zero_copy_only=False)


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    """Plain CSV without quoting (no value holds a comma), built column-wise with Arrow:
    several times faster than ``DataFrame.to_csv`` and byte-stable."""
    cols = []
    for name in frame.columns:
        col = frame[name].to_numpy()
        if col.dtype.kind == "f":
            col = np.char.mod("%.2f", col)
        cols.append(pc.cast(pa.array(col), pa.string()))
    lines = pc.binary_join_element_wise(*cols, ",")
    with open(path, "w", newline="\n") as f:
        f.write(",".join(frame.columns) + "\n")
        f.write("\n".join(lines.to_pylist()))
        f.write("\n")


def _mean_click(logit: np.ndarray, bias: float) -> float:
    with np.errstate(over="ignore"):
        return float(np.mean(1.0 / (1.0 + np.exp(-(logit + bias)))))


def _solve_bias(logit: np.ndarray, ctr: float) -> float:
    lo, hi = -30.0, 30.0
    # Widened (doubling) where [-30, 30] does not hold the root: large main_effect_std or
    # interaction_std spread the logits so far that -30 still clicks too often.
    steps = 80
    while _mean_click(logit, lo) >= ctr and lo > -1e12:
        lo, steps = lo * 2.0, 200
    while _mean_click(logit, hi) < ctr and hi < 1e12:
        hi, steps = hi * 2.0, 200
    if not _mean_click(logit, lo) < ctr <= _mean_click(logit, hi):
        raise DataError(f"synthetic: no domain bias gives the click rate {ctr} (the logits "
                        "are too spread for it); lower main_effect_std / interaction_std")
    for _ in range(steps):  # bisection: mean sigmoid is monotone in the bias
        mid = 0.5 * (lo + hi)
        if np.mean(1.0 / (1.0 + np.exp(-(logit + mid)))) < ctr:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _auc(y: np.ndarray, p: np.ndarray) -> float:
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = pd.Series(p).rank(method="average").to_numpy()
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _logloss(y: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


# ---------------------------------------------------------------------------- files
def generate_synthetic(cfg: SyntheticConfig, out_dir: Path | str) -> Path:
    """Write the synthetic data set to ``out_dir`` and return the path of its
    ``dataset.yaml`` (whose ``data:`` section :func:`load_data_config` reads).

    Same ``cfg`` -> byte-identical files. Example::

        yaml_path = generate_synthetic(SyntheticConfig(seed=1), Path("runs/data"))
        bundle = prepare_data(load_data_config(yaml_path))
    """
    if not isinstance(cfg, SyntheticConfig):
        raise TypeError(f"generate_synthetic: cfg must be a SyntheticConfig, got {type(cfg).__name__}")
    # A config built in code is checked as YAML is (and its field dicts become fields).
    cfg = SyntheticConfig.from_dict(cfg.to_dict())
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frame, truth, prob = build_synthetic(cfg)

    data_name = f"synthetic.{cfg.format}"
    data_path = out_dir / data_name
    tmp = out_dir / (data_name + ".tmp")
    if cfg.format == "csv":
        _write_csv(frame, tmp)
    else:
        frame.to_parquet(tmp, index=False)
    tmp.replace(data_path)

    cats = [f.name for f in cfg.fields if f.kind == "categorical"]
    nums = [f.name for f in cfg.fields if f.kind == "numeric"]
    multis = [{"name": f.name, "sep": "|", "max_len": f.max_len} for f in cfg.fields if f.kind == "multihot"]
    data_cfg: dict[str, Any] = {
        "name": f"synthetic-seed{cfg.seed}",
        "files": [data_name],
        "label": "click",
        "categorical": cats,
    }
    if nums:
        data_cfg["numeric"] = nums
    if multis:
        data_cfg["multihot"] = multis
    data_cfg.update({
        "domain": {"column": "domain", "source": list(cfg.source_domains), "target": cfg.target_domain},
        "split": {
            "target": {"method": "random", "valid": cfg.target_valid, "test": cfg.target_test, "seed": cfg.seed},
            "source": {"valid": cfg.source_valid, "seed": cfg.seed},
        },
        "min_count": cfg.min_count,
        "num_buckets": cfg.num_buckets,
        "on_bad_rows": "fail",
    })
    header = (
        f"# Written by autoft_fast.data.generate_synthetic (seed {cfg.seed}); see docs/data.md.\n"
        "# The `data:` section can be pasted into an experiment YAML as it is.\n"
    )
    (out_dir / "dataset.yaml").write_text(header + yaml.safe_dump({"data": data_cfg}, sort_keys=False))

    y = frame["click"].to_numpy()
    doms = frame["domain"].to_numpy()
    per_domain = {}
    for d, name in enumerate(truth.domains):
        m = doms == name
        per_domain[name] = {
            "rows": int(m.sum()),
            "ctr": round(float(y[m].mean()), 6),
            "bias": round(truth.bias[d], 6),
            "oracle_auc": round(_auc(y[m], prob[m]), 6),
            "oracle_logloss": round(_logloss(y[m], prob[m]), 6),
        }
    summary = {
        "config": cfg.to_dict(),
        "scale_main": round(truth.scale_main, 9),
        "scale_interaction": round(truth.scale_interaction, 9),
        "domains": per_domain,
    }
    # Undefined numbers (a domain with one label has no AUC) as null: standard JSON.
    (out_dir / "ground_truth.json").write_text(
        json.dumps(strict_json(summary), indent=2, allow_nan=False) + "\n")
    log.info(
        "generated %d rows in %.1fs into %s", len(frame), time.perf_counter() - t0, out_dir
    )
    return out_dir / "dataset.yaml"
