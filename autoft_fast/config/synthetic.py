"""The ``synthetic:`` section: the parameters of the synthetic multi-domain generator
(autoft_fast.data.synthetic, whose module docstring and ``docs/data.md`` give the reason for
each default).

Example:
    >>> SyntheticConfig.from_dict({"seed": 3, "n_target_rows": 10000}).n_target_rows
    10000
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from .data import DataError
from .schema import parse_section, section_to_dict, setting

__all__ = ["SyntheticConfig", "SyntheticField", "DEFAULT_FIELDS"]

_UNIT = dict(minimum=0.0, maximum=1.0, min_open=True, max_open=True)
_CORR = dict(minimum=-1.0, maximum=1.0)


@dataclass(frozen=True)
class SyntheticField:
    """One feature column of the generator. ``cardinality``/``zipf`` apply to categorical and
    multi-hot fields; ``max_len``/``mean_len`` to multi-hot ones (tags per row: Poisson with
    mean ``mean_len``, cut at ``max_len``, duplicates removed). For a numeric field,
    ``frequency: shifted`` moves the target's log-normal mean by ``SyntheticConfig.price_shift``."""

    error = DataError
    name: str = setting(doc="the column name")
    kind: str = setting("categorical", choices=("categorical", "numeric", "multihot"),
                        doc="categorical, numeric or multihot")
    cardinality: int = setting(100, minimum=2, doc="distinct ids")
    zipf: float = setting(1.0, minimum=0.0, doc="Zipf exponent of the id frequencies")
    effect: str = setting("stable", choices=("stable", "shifted"),
                          doc="whether the field's effect differs in the target")
    frequency: str = setting("same", choices=("same", "shifted"),
                             doc="whether the id frequencies differ in the target")
    max_len: int = setting(6, minimum=1, doc="multi-hot: most tags per row")
    mean_len: float = setting(2.0, minimum=0.0, maximum=1000.0,
                             doc="multi-hot: mean tags per row")


DEFAULT_FIELDS = (
    SyntheticField("user_id", cardinality=4000, zipf=1.1, effect="stable", frequency="shifted"),
    SyntheticField("item_id", cardinality=2000, zipf=1.1, effect="shifted", frequency="shifted"),
    SyntheticField("brand", cardinality=300, zipf=1.0, effect="shifted", frequency="same"),
    SyntheticField("category", cardinality=50, zipf=0.9, effect="stable", frequency="same"),
    SyntheticField("site_id", cardinality=200, zipf=1.0, effect="shifted", frequency="shifted"),
    SyntheticField("app_id", cardinality=500, zipf=1.05, effect="stable", frequency="shifted"),
    SyntheticField("device", cardinality=8, zipf=1.2, effect="stable", frequency="same"),
    SyntheticField("os", cardinality=4, zipf=1.0, effect="stable", frequency="same"),
    SyntheticField("hour", cardinality=24, zipf=0.2, effect="shifted", frequency="same"),
    SyntheticField("slot", cardinality=6, zipf=0.8, effect="stable", frequency="same"),
    SyntheticField("region", cardinality=30, zipf=0.8, effect="shifted", frequency="same"),
    SyntheticField("price", kind="numeric", effect="stable", frequency="shifted"),
    SyntheticField("tags", kind="multihot", cardinality=300, zipf=1.0, effect="shifted",
                   frequency="shifted", max_len=6, mean_len=2.0),
)


@dataclass(frozen=True)
class SyntheticConfig:
    """Parameters of the generator (the ``synthetic:`` section of an experiment YAML).

    Example::

        path = generate_synthetic(SyntheticConfig(seed=7, n_source_rows=50_000), Path("data"))
    """

    error = DataError
    seed: int = setting(2024, minimum=0, doc="one seed for parameters and rows")
    n_source_rows: int = setting(300_000, minimum=10, doc="rows of all source domains")
    n_target_rows: int = setting(30_000, minimum=10, doc="rows of the target domain")
    source_domains: tuple[str, ...] = setting(("src_a", "src_b", "src_c"), doc="source names")
    source_weights: tuple[float, ...] = setting((0.5, 0.3, 0.2), minimum=0.0, min_open=True,
                                                doc="share of source rows per source domain")
    source_ctr: tuple[float, ...] = setting((0.10, 0.08, 0.14), **_UNIT,
                                            doc="click rate per source domain")
    target_domain: str = setting("tgt", doc="the target domain's name")
    target_ctr: float = setting(0.06, **_UNIT, doc="the target's click rate")
    extra_targets: tuple[str, ...] = setting((), doc=(
        "more small target domains, each with n_target_rows rows, target_ctr, shift_corr and "
        "a frequency permutation of its own (for comparisons over several targets: the "
        "experiment's targets: key)"))
    latent_dim: int = setting(8, minimum=1, doc="width of the interaction vectors")
    main_effect_std: float = setting(0.6, minimum=0.0, doc="std of the main-effect logit sum")
    interaction_std: float = setting(0.6, minimum=0.0, doc="std of the interaction logit sum")
    shift_corr: float = setting(0.3, **_CORR, doc="target-to-base correlation of shifted effects")
    source_shift_corr: float = setting(0.9, **_CORR, doc="the same for each source domain")
    price_shift: float = setting(0.5, minimum=-50.0, maximum=50.0, doc=(
        "shift of the target's log-normal price mean (|shift| <= 50: exp of more overflows)"))
    days: int = setting(14, minimum=1, maximum=36_500, doc="time span of the ts column")
    fields: tuple[SyntheticField, ...] = setting(DEFAULT_FIELDS, doc=(
        "the feature columns; when given, replaces the whole default list"))
    format: str = setting("csv", choices=("csv", "parquet"), doc="file format written")
    # Written into dataset.yaml (the data config the demo reads).
    target_valid: float = setting(0.1, **_UNIT, doc="dataset.yaml: target valid fraction")
    target_test: float = setting(0.3, **_UNIT, doc="dataset.yaml: target test fraction")
    source_valid: float = setting(0.05, **_UNIT, doc="dataset.yaml: source valid fraction")
    min_count: int = setting(2, minimum=1, doc="dataset.yaml: min_count")
    num_buckets: int = setting(16, minimum=2, doc="dataset.yaml: num_buckets")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "SyntheticConfig":
        """Build from the ``synthetic:`` YAML section; unknown keys are an error naming the key.
        ``fields``, when given, replaces the whole default field list.

        Example::

            SyntheticConfig.from_dict({"seed": 3, "n_target_rows": 10000})
        """
        return parse_section(cls, d, "synthetic")

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (YAML-safe) that :meth:`from_dict` accepts again."""
        return section_to_dict(self)

    def check(self, section: str = "synthetic") -> None:
        """Raise :class:`DataError` naming the parameter for a rule across keys."""
        def need(ok: bool, key: str, what: str) -> None:
            if not ok:
                raise DataError(f"{section}.{key} must be {what}, got {getattr(self, key)!r}")

        k = len(self.source_domains)
        need(k >= 1 and all(self.source_domains), "source_domains", "a non-empty list of names")
        need(len(self.source_weights) == k, "source_weights",
             f"{k} positive numbers (one per source domain)")
        need(len(self.source_ctr) == k, "source_ctr",
             f"{k} numbers in (0, 1) (one per source domain)")
        need(bool(self.target_domain) and self.target_domain not in self.source_domains,
             "target_domain", "a name not among the sources")
        names = [*self.source_domains, self.target_domain, *self.extra_targets]
        need(len(set(names)) == len(names), "extra_targets",
             "names distinct from each other, the sources and target_domain")
        need(self.target_valid + self.target_test < 1, "target_test",
             "in (0, 1) with target_valid + target_test < 1")
        for key, names in (("source_domains", self.source_domains),
                           ("target_domain", [self.target_domain]),
                           ("extra_targets", self.extra_targets),
                           ("fields", [f.name for f in self.fields])):
            # The generator writes plain, unquoted CSV (see data.synthetic._write_csv).
            need(not any(set(n) & set(',"\n\r') for n in names), key,
                 "names without commas, double quotes or line breaks (they are written into "
                 "a CSV file)")
        names = [f.name for f in self.fields]
        if names and len(names) != len(set(names)):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise DataError(f"{section}.fields: the name {twice[0]!r} is given to more than one "
                            "field; every field needs a name of its own")
        reserved = sorted({"ts", "domain", "click"} & set(names))
        if reserved:
            raise DataError(f"{section}.fields: {reserved[0]!r} is the name of a column the "
                            "generator writes itself (ts, domain, click); rename the field")
        need(bool(names), "fields", "a non-empty list of fields")
        empty = [key for key, vals in (("fields", names), ("extra_targets", self.extra_targets))
                 if any(not str(v).strip() for v in vals)]
        if empty:
            raise DataError(f"{section}.{empty[0]}: a name must not be empty (it becomes a "
                            "column name or a domain value)")
        if not any(f.kind != "multihot" for f in self.fields):
            raise DataError(f"{section}.fields: every field is multi-hot; give at least one "
                            "categorical or numeric field (multi-hot fields alone leave the "
                            "model no single-valued field to look up)")
        w = [float(x) for x in self.source_weights]
        smallest = min(int(self.n_source_rows * x / sum(w)) for x in w)
        if smallest < 10:
            raise DataError(f"{section}: a source domain would get {smallest} rows "
                            f"(n_source_rows {self.n_source_rows} split by source_weights "
                            f"{self.source_weights}); raise n_source_rows or even out the weights "
                            "so that every source domain gets at least 10 rows")
