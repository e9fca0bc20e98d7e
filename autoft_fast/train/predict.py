"""Predicting with a saved run: the model directory holds everything it needs.

A fine-tuned model is saved (``save_model``) as two files side by side:

    model.pt     the model's state_dict (frozen and tuned tables, policy, buffers)
    model.json   strategy, seed, temperature, the model and autoft config sections, the
                 data config's column roles, the feature map and the vocabularies

so :func:`load_run` rebuilds the model and encodes new rows without the experiment YAML
or the training data. New rows are encoded by :class:`autoft_fast.data.encode.RowEncoder`
(the training pipeline's rules: unseen values -> OOV, the trained bucket edges and dense
moments) and read in chunks, so predicting a file needs memory for one chunk.

Example:
    >>> run = load_run("runs/demo-finetune-20260101-120000")
    >>> probs = run.predict("new.csv")            # a pandas Series, one value per row
    >>> run.predict_file("new.csv", "preds.csv", keep=["row_id"])
"""
from __future__ import annotations

import csv
import json
import logging
import os
import warnings
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .._io import remove_stale_temps, save_atomic, umask_mode, write_text_atomic
from ..config import AutoFTConfig, DataConfig, ModelConfig
from ..config.data import FILE_SUFFIXES, file_format, file_suffix
from ..config.strategies import STRATEGY_TABLE
from ..data import FeatureMap
from ..data.config import DataError
from ..data.encode import RowEncoder, feature_columns
from ..data.reading import as_text
from ..models import build_base_model, build_transfer_model
from .checkpoint import load_checkpoint
from .progress import LOGGER_NAME
from .trainer import predict as predict_logits

__all__ = ["save_model", "load_run", "SavedRun", "find_model_dir", "MODEL_FILE", "INFO_FILE",
           "PREDICT_CHUNK_ROWS"]

MODEL_FILE = "model.pt"
INFO_FILE = "model.json"
INFO_FORMAT = 1
# Rows read, encoded and scored at a time: memory grows with it, results do not.
PREDICT_CHUNK_ROWS = 1 << 18
PROBABILITY_COLUMN = "probability"

log = logging.getLogger(LOGGER_NAME)


def save_model(out_dir: Path, model: torch.nn.Module, cfg, bundle, strategy: str,
               seed: int) -> Path:
    """Write ``model.pt`` (the weights) and ``model.json`` (what rebuilding and encoding
    need) into ``out_dir``; returns out_dir. ``cfg`` is the run's ExperimentConfig and
    ``bundle`` its DataBundle (feature map, vocabularies).

    Example:
        >>> save_model(Path("runs/x/run"), model, cfg, bundle, "autoft", 0)
        PosixPath('runs/x/run')
    """
    out_dir = Path(out_dir)
    data_cfg = bundle_data_config(cfg, bundle)
    info = {
        "format": INFO_FORMAT,
        "strategy": strategy,
        "seed": int(seed),
        "tau": float(model.tau) if hasattr(model, "tau") else None,
        "model": cfg.model.to_dict(),
        "autoft": cfg.autoft.to_dict(),
        "data": data_cfg.to_dict(),  # column roles (and the files it was trained on)
        "feature_map": bundle.feature_map.to_dict(),
        "vocabularies": bundle.vocabularies,
    }
    save_atomic({k: v.cpu() for k, v in model.state_dict().items()}, out_dir / MODEL_FILE)
    write_text_atomic(json.dumps(info), out_dir / INFO_FILE)
    return out_dir


def bundle_data_config(cfg, bundle) -> DataConfig:
    """The DataConfig that produced ``bundle`` (kept on it by the runner's load_data)."""
    data_cfg = getattr(bundle, "data_config", None) or cfg.data
    if data_cfg is None:
        raise ValueError("save_model: the bundle carries no data config (load it with "
                         "autoft_fast.train.runner.load_data)")
    return data_cfg


def find_model_dir(path: str | os.PathLike) -> Path:
    """The folder holding model.json under ``path``: ``path`` itself, or the one model
    folder below it (a finetune run's ``run/``). Several (a compare run with saved models)
    is an error listing them.

    Example:
        >>> find_model_dir("runs/demo-finetune-20260101-120000")
        PosixPath('runs/demo-finetune-20260101-120000/run')
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--run {str(path)!r} does not exist")
    if path.is_file():
        path = path.parent
    if (path / INFO_FILE).is_file():
        return path
    found = sorted(p.parent for p in path.rglob(INFO_FILE))
    if len(found) == 1:
        return found[0]
    if not found:
        if any(path.rglob(MODEL_FILE)):
            hint = (" (it has model.pt but no model.json: a run saved before models were "
                    "self-contained; fine-tune it again)")
        elif any(path.rglob("last.pt")):  # the checkpoint of a fine-tuning not yet finished
            # --resume takes the run folder (the one with run.json), not its run/ subfolder.
            run = path.parent if not (path / "run.json").is_file() and (
                path.parent / "run.json").is_file() else path
            hint = (" (a fine-tuning in it was interrupted before its model was saved: "
                    f"--resume {str(run)!r} on the command that started it continues it)")
        else:
            hint = ""
        raise FileNotFoundError(f"--run {str(path)!r} holds no saved model ({INFO_FILE}){hint}; "
                                "finetune saves one, compare with --keep-models")
    shown = ", ".join(str(p.relative_to(path)) for p in found[:8])
    raise ValueError(f"--run {str(path)!r} holds {len(found)} saved models ({shown}"
                     f"{' ...' if len(found) > 8 else ''}); name one of those folders")


class SavedRun:
    """A loaded model with its feature map: ``predict`` scores new rows.

    Example:
        >>> run = load_run("runs/x")
        >>> run.strategy, run.predict(frame)[:3].tolist()
    """

    def __init__(self, model, encoder: RowEncoder, info: dict, path: Path,
                 device: torch.device, batch_size: int):
        self.model = model
        self.encoder = encoder
        self.info = info
        self.path = path
        self.device = device
        self.batch_size = batch_size

    @property
    def strategy(self) -> str:
        """The transfer strategy the model was trained with."""
        return self.info["strategy"]

    @property
    def feature_columns(self) -> list[str]:
        """The input columns the model reads."""
        return feature_columns(self.encoder.cfg)

    def predict(self, data, *, sep: str | None = None) -> pd.Series:
        """Click probabilities of the rows of ``data`` (a CSV / TSV / Parquet path or a
        pandas DataFrame), one per row in row order, as a float64 Series named
        'probability' (index: the frame's, or 0..N-1 for a file). ``sep``: the field
        separator of a CSV file (default: the run's ``data.csv_sep``, tab for a .tsv file).

        Example:
            >>> load_run("runs/x").predict(pd.DataFrame({"user": ["u1"], "item": ["i2"]}))
        """
        self.encoder.reset_counts()
        if isinstance(data, pd.DataFrame):
            probs = self.score_frame(_frame_lists_as_text(
                data, {m.name: m.sep for m in self.encoder.cfg.multihot},
                set(self.feature_columns)))
            self._warn_unknown("the frame")
            return pd.Series(probs, index=data.index, name=PROBABILITY_COLUMN)
        layout = self._checked_layout(Path(data), sep)
        parts, n = [], 0
        for frame in self.read_frames(data, list(dict.fromkeys(self.feature_columns)), sep=sep,
                                      layout=layout):
            parts.append(self.score_frame(frame, first_row=n))
            n += len(frame)
        probs = np.concatenate(parts) if parts else np.zeros(0)
        self._warn_unknown(Path(data).name, self._without_label(layout))
        return pd.Series(probs, name=PROBABILITY_COLUMN)

    def _without_label(self, layout: tuple[list[str], bool]) -> bool:
        """Whether a file of ``layout`` (see _layout) is header-less and read as the columns
        without the label."""
        names, has_header = layout
        return not has_header and len(names) < len(self.encoder.cfg.columns)

    def _warn_unknown(self, name: str, without_label: bool = False) -> None:
        """Warn when the rows just scored had columns of mostly unknown values."""
        bad = self.encoder.mostly_unknown()
        if not bad:
            return
        shown = ", ".join(f"'{c}' {v:.0%}" for c, v in sorted(bad.items(), key=lambda kv: -kv[1]))
        hint = ("; the file has no header and was read as data.columns without the label: if "
                "another column is missing instead, every column after it is misread"
                if without_label else
                "; expected for values the model never saw (new users or items), otherwise "
                "check the columns: their names, or for a file without a header, their order")
        respelled = [(c, self.encoder.respelled[c]) for c in bad if self.encoder.respelled[c][0]]
        if respelled:
            c, (k, (met, known)) = respelled[0]
            hint += (f"; {k:,} of the unknown values of '{c}' are integers the model knows in "
                     f"the other spelling (e.g. {met!r} here, {known!r} in training): a CSV "
                     "written from a float column (pandas writes an integer column with "
                     "missing values as floats) spells ids 'N.0', a Parquet file or an integer "
                     "column 'N'; write them as the training files did")
        warnings.warn(f"{name}: most values of column(s) {shown} are unknown to the model and "
                      f"get their field's OOV row{hint}", UserWarning, stacklevel=3)

    def _checked_layout(self, path: Path, sep: str | None = None) -> tuple[list[str], bool]:
        """The file's layout (see _layout), after checking that every feature column is in
        it once."""
        from ..data.reading import check_columns

        layout = self._layout(path, sep)
        check_columns([(c, "feature") for c in self.feature_columns], layout[0], path,
                      scoring=True)
        return layout

    def _sep(self, path: Path, sep: str | None) -> str:
        """The separator a CSV ``path`` is read with: ``sep``, else tab for a .tsv file, else
        the run's ``data.csv_sep``."""
        if sep is not None:
            if not isinstance(sep, str) or len(sep) != 1:
                raise DataError(f"sep must be one character (e.g. ',' or '\\t'), got {sep!r}")
            return sep
        return "\t" if file_suffix(Path(path))[0] == ".tsv" else self.encoder.cfg.csv_sep

    def _layout(self, path: Path, sep: str | None = None) -> tuple[list[str], bool]:
        """The file's column names and whether its first line is a header (a CSV file of a
        run whose data had no header, ``data.columns``, may come with one or without)."""
        cfg = self.encoder.cfg
        return _header(path, self._sep(path, sep), cfg.columns, cfg.label, self.feature_columns)

    def score_frame(self, frame: pd.DataFrame, first_row: int | None = None) -> np.ndarray:
        """float64 probabilities of the rows of one frame (``first_row``: the file's rows
        before it, for error messages)."""
        batch = self.encoder.encode(frame, first_row)
        logits = predict_logits(self.model, batch, self.batch_size, device=self.device)
        return torch.sigmoid(logits.double()).numpy()

    def read_frames(self, path, columns: list[str] | None = None, chunk_rows: int | None = None,
                    verbatim=(), sep: str | None = None, layout=None):
        """Frames of ``path`` (every column, or ``columns``), ``chunk_rows`` at a time.
        The ``verbatim`` columns are also given as text exactly as stored, in
        ``frame.attrs["verbatim"]`` (what predict_file copies to its output). ``layout``:
        the file's ``_layout`` when the caller has it already."""
        cfg = self.encoder.cfg
        names = None
        if _format(Path(path)) == "csv":
            header, has_header = layout or self._layout(Path(path), sep)
            names = None if has_header else header
            if not has_header and len(header) < len(cfg.columns):
                log.info("%s has no header line and one field fewer than data.columns: read "
                         "as its columns without the label '%s'", Path(path).name, cfg.label)
        return _read_frames(Path(path), self._sep(path, sep), columns, chunk_rows or PREDICT_CHUNK_ROWS,
                            {m.name: m.sep for m in cfg.multihot}, frozenset(verbatim),
                            frozenset(self.feature_columns), names)

    def predict_file(self, data, out, keep: list[str] | None = None, *,
                     force: bool = False, sep: str | None = None) -> int:
        """Write ``out`` (CSV; Parquet, TSV or gzip when its name ends in .parquet, .tsv or
        .gz): the ``keep`` columns of ``data`` (default: every column
        that is not a feature; a name the header repeats is left out of it, with a warning)
        then 'probability', one line per input row; returns the number of rows. An existing
        ``out`` is kept unless ``force``.

        Example:
            >>> load_run("runs/x").predict_file("new.csv", "preds.csv", keep=["row_id"])
            1000000
        """
        data, out = Path(data), Path(out)
        if out.exists() and data.exists() and os.path.samefile(out, data):
            raise DataError(f"--out {str(out)!r} is the input file: the predictions would "
                            "overwrite the rows they are made from; give another file name")
        if out.is_dir():  # before the --force hint: --force cannot replace a folder
            raise IsADirectoryError(f"--out {str(out)!r} is a directory; give a file name")
        if out.exists() and not force:
            raise FileExistsError(f"--out {str(out)!r} exists; pass --force to overwrite it")
        from ..data.reading import check_columns

        layout = self._checked_layout(data, sep)
        header = layout[0]
        features = set(self.feature_columns)
        chosen = keep is not None
        if keep is None:
            keep = [c for c in dict.fromkeys(header)
                    if c not in features and c != self.encoder.cfg.label
                    and not c.startswith("__index_level_")]  # a pandas index stored in Parquet
            # A name the header repeats cannot be copied as one column; the model does not
            # read it, so the rest is scored and the output says what it lacks.
            repeated = [c for c in keep if header.count(c) > 1]
            if repeated:
                keep = [c for c in keep if c not in repeated]
                warnings.warn(f"{data.name}: column(s) {repeated} appear more than once in the "
                              "header, so they are not copied to the output; --keep names the "
                              "columns to copy", UserWarning, stacklevel=2)
        unknown = [c for c in keep if c not in header]
        if unknown:
            raise DataError(f"--keep column(s) {unknown} not in {data.name}; columns: "
                            f"{header[:30]}")
        if PROBABILITY_COLUMN in keep:
            raise DataError(
                f"{data.name} has a column named {PROBABILITY_COLUMN!r}, the name of the "
                "output's column: "
                + ("leave it out of --keep" if chosen else
                   "give --keep with the columns to copy (without it)"))
        check_columns([(c, "--keep") for c in keep], header, data)
        cfg = self.encoder.cfg
        dom = cfg.domain_column if header.count(cfg.domain_column) == 1 else None
        needed = list(dict.fromkeys([*self.feature_columns, *keep, *([dom] if dom else [])]))
        blocker = next((p for p in [*reversed(out.parents)] if p.exists() and not p.is_dir()),
                       None)
        if blocker is not None:
            raise DataError(f"--out {str(out)!r}: {str(blocker)!r} is a file, not a folder")
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            # What a killed predict of this --out left (a hidden partial file that can be
            # as large as the output); one idle for 10 minutes is no live write.
            if remove_stale_temps(out.parent, out.name, older_than=600):
                log.info("removed the partial output of an earlier, interrupted predict "
                         "into %s", out)
            fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
            umask_mode(fd)
        except OSError as e:
            raise DataError(f"--out {str(out)!r} cannot be written in {str(out.parent)!r} "
                            f"({e.strerror or e})") from None
        n = other = 0
        self.encoder.reset_counts()
        try:
            with _OutputWriter(fd, out, [*keep, PROBABILITY_COLUMN]) as writer:
                for frame in self.read_frames(data, needed, verbatim=keep, sep=sep,
                                              layout=layout):
                    if dom is not None:
                        other += int((as_text(frame[dom]).fillna("") != cfg.target_domain).sum())
                    # The kept columns as the file stores them (a Parquet int64 id with
                    # nulls would otherwise pass through float64 and lose digits).
                    texts = frame.attrs.get("verbatim", {})
                    res = pd.DataFrame({c: texts.get(c, frame[c]) for c in keep},
                                       index=frame.index)
                    res[PROBABILITY_COLUMN] = self.score_frame(frame, first_row=n)
                    writer.write(res)
                    n += len(frame)
            os.replace(tmp, out)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._warn_unknown(data.name, self._without_label(layout))
        if other:
            log.info("%s of the %s rows of %s are not of the model's target domain %r (column "
                     "%r): the model was fine-tuned for that domain", f"{other:,}", f"{n:,}",
                     data.name, cfg.target_domain, dom)
        return n


class _OutputWriter:
    """The predictions file in the format its name says: ``.parquet`` / ``.pq`` Parquet (the
    copied columns as text, as the CSV has them; probability float64), ``.gz`` gzip, ``.tsv``
    tab-separated, anything else CSV. Written to the open temporary file ``fd``."""

    def __init__(self, fd: int, out: Path, columns: list[str]) -> None:
        import io

        name = out.name.lower()
        self.columns, self.n = list(dict.fromkeys(columns)), 0  # as the frames' columns
        self.parquet = name.endswith((".parquet", ".pq"))
        self.sep = "\t" if name.removesuffix(".gz").endswith(".tsv") else ","
        self.raw = os.fdopen(fd, "wb")
        self.pq_writer = None
        self.f = None
        if name.endswith(".gz"):
            import gzip
            gz = gzip.GzipFile(fileobj=self.raw, mode="wb", filename=name.removesuffix(".gz"),
                               mtime=0)
            self.f = io.TextIOWrapper(gz, encoding="utf-8", newline="")
        elif not self.parquet:
            self.f = io.TextIOWrapper(self.raw, encoding="utf-8", newline="")

    def _schema(self):
        import pyarrow as pa
        return pa.schema([(c, pa.float64() if c == PROBABILITY_COLUMN else pa.string())
                          for c in self.columns])

    def write(self, res: pd.DataFrame) -> None:
        if self.parquet:
            import pyarrow as pa
            import pyarrow.parquet as pq
            if self.pq_writer is None:
                self.pq_writer = pq.ParquetWriter(self.raw, self._schema())
            arrays = [pa.array(res.iloc[:, i].to_numpy(dtype=np.float64))
                      if c == PROBABILITY_COLUMN else
                      pa.array(as_text(res.iloc[:, i]).to_numpy(dtype=object), type=pa.string(),
                               from_pandas=True)
                      for i, c in enumerate(self.columns)]
            self.pq_writer.write_batch(pa.RecordBatch.from_arrays(arrays, schema=self._schema()))
        else:
            res.to_csv(self.f, index=False, header=self.n == 0, float_format="%.9g",
                       sep=self.sep)
        self.n += len(res)

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb) -> None:
        try:
            if kind is None and self.parquet and self.pq_writer is None:
                import pyarrow.parquet as pq  # no rows: the schema alone
                self.pq_writer = pq.ParquetWriter(self.raw, self._schema())
            elif kind is None and self.n == 0:  # the header alone, as a line
                csv.writer(self.f, delimiter=self.sep,
                           lineterminator="\n").writerow(self.columns)
        finally:
            try:
                if self.pq_writer is not None:
                    self.pq_writer.close()
                if self.f is not None:
                    self.f.close()  # flushes; closes the gzip stream (and a plain file)
            finally:
                if not self.raw.closed:
                    self.raw.close()


def load_run(path: str | os.PathLike, *, device: str | torch.device = "cpu",
             backend: str | None = None, batch_size: int = 8192) -> SavedRun:
    """Load a saved model (a run directory, or its model folder) for prediction: rebuild
    the strategy's model from model.json, load model.pt, and set up the encoder of new
    rows. ``backend`` overrides the gated-embedding backend ('auto' by default: the
    fastest one on ``device``). No experiment YAML or training data is read.

    Example:
        >>> run = load_run("runs/demo-finetune-20260101-120000")
        >>> run.predict("new.csv").head()
    """
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} was asked for but CUDA is not available")
    folder = find_model_dir(path)
    info_path, weights_path = folder / INFO_FILE, folder / MODEL_FILE
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
        if info.get("format") != INFO_FORMAT:
            raise ValueError(f"format {info.get('format')!r}, expected {INFO_FORMAT}")
        fm = FeatureMap.from_dict(info["feature_map"])
        data_cfg = DataConfig.from_dict(info["data"], folder)
        mcfg = ModelConfig.from_dict(info["model"])
        acfg = AutoFTConfig.from_dict({**info["autoft"], "backend": "auto"})
        strategy = info["strategy"]
        row = STRATEGY_TABLE[strategy]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"saved model {str(info_path)!r} could not be read ({e}); "
                         "fine-tune the run again") from None
    if backend is not None:  # outside the try: a bad --backend is the user's, not the file's
        acfg = acfg.with_backend(backend)
    encoder = RowEncoder(data_cfg, fm, info["vocabularies"])
    pretrained = build_base_model(fm, mcfg) if row.needs_pretrained else None
    value_counts = None
    if row.has_policy and ("freq" in acfg.policy_input
                           or (row.field_policy and acfg.field_policy == "frequency")):
        # Placeholders: the trained frequency tables (and threshold) are buffers of model.pt.
        zeros = torch.zeros(fm.num_rows)
        value_counts = (zeros, zeros)
    model = build_transfer_model(strategy, pretrained, fm, mcfg, acfg, value_counts=value_counts)
    try:
        state = load_checkpoint(weights_path)
    except FileNotFoundError:
        raise ValueError(f"saved model {str(weights_path)!r} does not exist; fine-tune the "
                         "run again (or name the folder that holds model.pt)") from None
    except RuntimeError as e:
        cause = getattr(e, "__cause__", None) or e
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        raise ValueError(f"saved model {str(weights_path)!r} could not be read (damaged, "
                         f"or not a model.pt) [{first[:200]}]; fine-tune the run again "
                         "to write it anew") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        # torch's message: a header line ending in ':', then one line per mismatch.
        details = [ln.strip()[:300] + ("..." if len(ln.strip()) > 300 else "")
                   for ln in str(e).splitlines()[1:] if ln.strip()]
        shown = "; ".join(details[:3]) + (f"; and {len(details) - 3} more" if len(details) > 3
                                           else "")
        raise ValueError(f"weights {str(weights_path)!r} do not fit the model described by "
                         f"{INFO_FILE} (a model.pt of another run or model?): "
                         f"{shown or str(e).splitlines()[0]}") from None
    if info.get("tau") is not None and hasattr(model, "set_tau"):
        model.set_tau(float(info["tau"]))
    model.to(device)
    model.eval()
    if row.has_policy and acfg.eval_gates == "sample":
        warnings.warn(f"{folder} was trained with autoft.eval_gates: sample, so its gates at "
                      "evaluation are random draws: each prediction is one draw, and two "
                      "predictions of a row (or one and the run's test metric) differ a little",
                      UserWarning, stacklevel=1)
    return SavedRun(model, encoder, info, folder, device, batch_size)


def _header(path: Path, sep: str, columns=(), label=None, features=None) -> tuple[list[str], bool]:
    """The file's column names as written (a repeated name stays repeated), and whether its
    first line is a header (see data.reading.csv_layout: ``columns`` are the names of a
    header-less file)."""
    from ..data.reading import csv_layout

    fmt = _format(path)
    if fmt == "parquet":
        import pyarrow.parquet as pq
        try:
            return list(pq.ParquetFile(path).schema_arrow.names), True
        except Exception as exc:
            raise DataError(f"cannot read {path} as Parquet: {exc}") from None
    return csv_layout(path, sep, columns, label=label, features=features)


def _format(path: Path) -> str:
    if not path.is_file():
        if path.is_dir():
            raise IsADirectoryError(f"--data {str(path)!r} is a directory; give a CSV, TSV or "
                                    "Parquet file")
        raise FileNotFoundError(f"--data {str(path)!r} does not exist")
    fmt = file_format(path)
    if fmt is None:
        raise DataError(f"--data {str(path)!r}: unknown file type {path.suffix!r}; one of "
                        f"{sorted(FILE_SUFFIXES)} (CSV and TSV also gzip-compressed, *.gz)")
    return fmt[0]


def _read_frames(path: Path, sep: str, columns, chunk_rows: int, list_seps: dict,
                 verbatim=frozenset(), features=None, names=None):
    """The file's rows as frames (CSV: text columns, missing = NaN), chunk by chunk;
    Parquet list columns of multi-hot fields are joined by their separator. Parquet
    ``verbatim`` columns also come as their stored text in ``frame.attrs['verbatim']``
    (CSV columns are text already); a list column that is not a feature is only that.
    ``names``: the column names of a CSV file without a header line."""
    import pyarrow as pa

    fmt = _format(path)
    if fmt == "parquet":
        import pyarrow.parquet as pq
        pf = pq.ParquetFile(path)
        for batch in pf.iter_batches(batch_size=chunk_rows, columns=columns):
            yield _as_frame(batch, list_seps, path, verbatim, features)
        return
    import pyarrow.csv as pcsv
    from ..data.reading import _block_bytes, arrow_source, pandas_compression

    from ..data.reading import LineBreakCheck

    header = names if names is not None else _header(path, sep)[0]
    cols = columns or header
    short, bad = [], []
    features = features or frozenset()
    line_breaks = LineBreakCheck({c: "feature" if c in features else
                                  "--keep" if c in verbatim else "domain column" for c in cols})

    def on_invalid(row) -> str:
        bad.append(row)
        # A short line of a file with a header gets empty values, as in training; in a
        # header-less file (data.columns, a fixed layout) it is damage, as in training.
        if row.actual_columns < row.expected_columns and names is None:
            short.append(row)
        return "error"  # every input row gets its prediction: no line is skipped

    def bad_line() -> str:
        r = bad[0]
        number = r.number if r.number is not None else _first_line_of_width(
            path, sep, r.expected_columns, names is None)
        where = f"line {number}" if number is not None else "a line"
        return (f"{path.name}, {where}: expected {r.expected_columns} fields, saw "
                f"{r.actual_columns}" + (" (a cut line?)" if r.actual_columns < r.expected_columns
                                         else ""))

    done = 0
    try:
        reader = pcsv.open_csv(
            arrow_source(path),
            read_options=pcsv.ReadOptions(block_size=_block_bytes(path, chunk_rows),
                                          **({"column_names": names} if names else {})),
            parse_options=pcsv.ParseOptions(delimiter=sep,
                                            invalid_row_handler=on_invalid),
            convert_options=pcsv.ConvertOptions(
                include_columns=cols, column_types={c: pa.string() for c in cols},
                strings_can_be_null=True, null_values=[""], quoted_strings_can_be_null=True))
        for batch in reader:
            line_breaks.check(batch, path.name, done, sep, len(header))
            frame = _as_frame(batch, {}, path)
            done += len(frame)
            yield frame
        line_breaks.warn(stacklevel=3)
    except OSError as e:  # a damaged gzip stream, seen by Arrow's decompressor
        raise DataError(f"cannot read {path}: {e} (a damaged or cut file?)") from None
    except pa.ArrowInvalid as e:
        from ..data.reading import header_only
        if not short and done == 0 and names is None and header_only(path):
            return  # the header alone, without a final line break: no rows
        if not short:
            if bad:
                raise DataError(f"cannot score {bad_line()}; every line must have the "
                                "file's fields") from None
            raise DataError(f"cannot parse {path} as CSV: {str(e).splitlines()[0]}") from None
        # A line with fewer fields than the header: its missing fields are empty, as in
        # training (data/reading.py); the rows after those already read, by pandas' reader.
        yield from _pandas_frames(path, sep, cols, chunk_rows, done, names)


def _first_line_of_width(path: Path, sep: str, width: int, header: bool) -> int | None:
    """The file line (1-based) of the first record without ``width`` fields (Arrow's
    multi-threaded reader does not number the line it refuses); None if none is found."""
    from ..data.reading import open_text
    try:
        with open_text(path) as f:
            reader = csv.reader(f, delimiter=sep)
            for i, row in enumerate(reader):
                if (i > 0 or not header) and row and len(row) != width:
                    return reader.line_num
    except (OSError, EOFError, UnicodeDecodeError, csv.Error):
        return None
    return None


def _pandas_frames(path: Path, sep: str, cols, chunk_rows: int, skip: int, names=None):
    """Text frames of ``cols`` from data row ``skip`` on; a short line's missing fields are
    empty (NaN), a line with too many fields is a DataError. (The C parser's ``skiprows``
    counts rows, a quoted line break inside one included: tested.)"""
    from ..data.reading import pandas_compression

    first = 0 if names else 1  # the data's first line
    layout = dict(header=None, names=list(names), index_col=False) if names else {}
    try:
        reader = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, na_values=[""],
                             engine="c", chunksize=chunk_rows, compression=pandas_compression(path),
                             skiprows=range(first, first + skip) if skip else None, **layout)
        for df in reader:
            yield df[list(cols)].reset_index(drop=True)
    except pd.errors.ParserError as e:
        raise DataError(f"cannot parse {path} as CSV: {str(e).splitlines()[0]}") from None
    except (OSError, EOFError) as e:  # a damaged gzip stream
        raise DataError(f"cannot read {path}: {e} (a damaged or cut file?)") from None


def _as_frame(batch, list_seps: dict, path: Path, verbatim=frozenset(),
              features=None) -> pd.DataFrame:
    import pyarrow as pa

    from ..data.reading import _list_as_text, arrow_to_pandas

    out, texts = {}, {}
    for name, col in zip(batch.schema.names, batch.columns):
        if name in verbatim:
            texts[name] = _stored_text(col)
        is_list = pa.types.is_list(col.type) or pa.types.is_large_list(col.type)
        if is_list and name in verbatim and features is not None and name not in features:
            out[name] = texts[name]  # copied only, never encoded
        elif is_list:
            if name not in list_seps:
                raise DataError(f"column '{name}' in {path.name} is a Parquet list column; "
                                "only multihot columns may hold lists")
            out[name] = _list_as_text(col, list_seps[name], name, path)
        else:
            out[name] = arrow_to_pandas(col)
    frame = pd.DataFrame(out)
    if texts:
        frame.attrs["verbatim"] = texts
    return frame


def _frame_lists_as_text(frame: pd.DataFrame, list_seps: dict, features: set) -> pd.DataFrame:
    """A frame whose multi-hot cells are lists or arrays (``pd.read_parquet`` gives numpy
    arrays, ``str.split`` lists) with those cells joined by the field's separator, as a
    Parquet list column of a file is read; text cells are kept. A list in another feature
    column is an error, as in a file. The caller's frame is not changed."""
    def is_list(v) -> bool:
        return isinstance(v, (list, tuple, np.ndarray))

    def token(v) -> str:
        if isinstance(v, (float, np.floating)) and np.isfinite(v) and v == int(v):
            return str(int(v))  # 3.0 reads as the 3 a list<int64> column gives
        return "" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v)

    out = None
    for name in frame.columns:
        col = frame[name]
        if name not in features or not pd.api.types.is_object_dtype(col):
            continue
        lists = col.map(is_list)
        if not lists.any():
            continue
        if name not in list_seps:
            raise DataError(f"column '{name}' of the frame holds lists (row "
                            f"{int(np.flatnonzero(lists.to_numpy())[0])}); only multihot "
                            "columns may hold lists")
        sep = list_seps[name]

        def joined(v, sep=sep, name=name):
            if not is_list(v):
                return v
            parts = [token(x) for x in v]
            bad = next((t for t in parts if sep in t), None)
            if bad is not None:
                raise DataError(f"multihot column '{name}' of the frame holds the token "
                                f"{bad!r}, which contains its separator {sep!r}")
            return sep.join(parts)

        out = frame.copy() if out is None else out
        out[name] = col.map(joined)
    return frame if out is None else out


def _stored_text(col) -> pd.Series:
    """A Parquet column as the text of its stored values (missing: None): integers keep
    every digit, floats their shortest round-trip form; a list as JSON."""
    import json

    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        return pd.Series([None if v is None else json.dumps(v, default=str)
                          for v in col.to_pylist()], dtype=object)
    try:
        return pd.Series(pc.cast(col, pa.string()).to_pylist(), dtype=object)
    except pa.ArrowException:  # a type Arrow cannot cast to text: Python's str of each value
        return pd.Series([None if v is None else str(v) for v in col.to_pylist()],
                         dtype=object)
