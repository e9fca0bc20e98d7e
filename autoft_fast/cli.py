"""The `autoft-fast` command: demo, generate, pretrain, finetune, compare, predict, bench.

Example:
    $ autoft-fast demo
    $ autoft-fast compare --config my.yaml --seeds 3
    $ autoft-fast predict --run runs/my-finetune-20260101-120000 --data new.csv --out preds.csv
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

__all__ = ["main", "build_parser"]

PROG = "autoft-fast"

EPILOGS = {
    "demo": "example:\n  autoft-fast demo                       # nine strategies, 3 seeds, 2 targets\n"
            "  autoft-fast demo --run-dir /tmp/runs --backend reference",
    "generate": "example:\n  autoft-fast generate --config my.yaml --out data/synth\n"
                "  autoft-fast generate --out data/demo   # the embedded demo's generator",
    "pretrain": "example:\n  autoft-fast pretrain --config my.yaml",
    "finetune": "example:\n  autoft-fast finetune --config my.yaml --strategy autoft --seed 1\n"
                "  autoft-fast finetune --config my.yaml --strategy autoft --resume",
    "compare": "example:\n  autoft-fast compare --config my.yaml --seeds 3\n"
               "  autoft-fast compare --config my.yaml --strategies finetune_all,autoft\n"
               "  autoft-fast compare --config my.yaml --resume runs/my-compare-20260101-120000",
    "predict": "example:\n  autoft-fast predict --run runs/my-finetune-20260101-120000 "
               "--data new.csv --out preds.csv\n"
               "  autoft-fast predict --run runs/x/run --data new.parquet --out p.csv "
               "--keep row_id,user",
    "bench": "example:\n  autoft-fast bench ops --help\n"
             "  autoft-fast bench train --backends reference cpu --reps 3",
}


def _add_common(p: argparse.ArgumentParser, config: bool = True) -> None:
    if config:
        p.add_argument("--config", "-c", metavar="YAML",
                       help="experiment YAML (default: the embedded demo config)")
    p.add_argument("--backend", metavar="NAME",
                   help="gated-embedding backend for the AutoFT models: auto, reference, cpu, "
                        "cuda or triton (overrides autoft.backend)")
    p.add_argument("--run-dir", metavar="DIR", help="where run directories go (overrides run_dir)")
    p.add_argument("--device", metavar="DEV",
                   help="cpu, cuda, cuda:N or auto (overrides device; auto = cuda if present)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="torch CPU threads (default: the cores not busy with other work, "
                        "cores minus the load average, at least 1)")
    p.add_argument("--verbose", "-v", action="store_true", help="log every epoch to the terminal")
    p.add_argument("--no-progress", action="store_true", help="never draw progress bars")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of `autoft-fast` (exposed for the docs and the tests)."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=fmt,
        description="AutoFT transfer learning for CTR models with fused gated-embedding kernels.",
        epilog="example:\n  autoft-fast demo\n  autoft-fast compare --config my.yaml --seeds 3\n\n"
               "run `autoft-fast COMMAND --help` for each command's options")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("demo", help="generate synthetic data, pre-train, compare all strategies",
                       description="Run the embedded demo: generate the synthetic multi-domain "
                                   "data, pre-train the base model on the source domains, and "
                                   "compare every strategy over the configured seeds.",
                       epilog=EPILOGS["demo"], formatter_class=fmt)
    _add_common(p, config=False)
    p.add_argument("--seeds", type=int, metavar="N", help="number of seeds (default: the demo config's 3)")

    p = sub.add_parser("generate", help="write the synthetic data set of a config",
                       description="Generate the synthetic: section's data set (CSV files and "
                                   "a dataset YAML) into --out.",
                       epilog=EPILOGS["generate"], formatter_class=fmt)
    p.add_argument("--config", "-c", metavar="YAML",
                   help="experiment YAML with a synthetic: section (default: the embedded demo)")
    p.add_argument("--out", "-o", metavar="DIR", required=True, help="output directory")
    p.add_argument("--force", action="store_true",
                   help="overwrite the data set files already in --out")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")

    p = sub.add_parser("pretrain", help="pre-train the base model on the source domains",
                       description="Pre-train the base model on source_train with early "
                                   "stopping on source_valid; the model is cached and reused by "
                                   "finetune and compare.",
                       epilog=EPILOGS["pretrain"], formatter_class=fmt)
    _add_common(p)
    p.add_argument("--force", action="store_true", help="retrain even if a cached model exists")

    p = sub.add_parser("finetune", help="fine-tune one strategy on the target domain",
                       description="Fine-tune one strategy from the pre-trained model (trained "
                                   "first if not cached) on target_train, early-stop on "
                                   "target_valid, report target_test metrics.",
                       epilog=EPILOGS["finetune"], formatter_class=fmt)
    _add_common(p)
    p.add_argument("--strategy", "-s", required=True, metavar="NAME",
                   help="one of target_only, source_only, finetune_all, freeze_embedding, "
                        "freeze_dnn, l2sp, autoft_layer, autoft_field, autoft")
    p.add_argument("--seed", type=int, metavar="N", help="seed (default: the first configured)")
    p.add_argument("--resume", nargs="?", const="latest", metavar="RUN_DIR",
                   help="continue an interrupted run: its run directory, or the latest one "
                        "of this config, strategy and seed")

    p = sub.add_parser("compare", help="every strategy over several seeds: table, CSV, plots",
                       description="Pre-train once, fine-tune every configured strategy for "
                                   "every seed, print the comparison table and write "
                                   "results.csv, runs.csv and PNG plots in the run directory.",
                       epilog=EPILOGS["compare"], formatter_class=fmt)
    _add_common(p)
    p.add_argument("--seeds", type=int, metavar="N", help="number of seeds (default: the config's)")
    p.add_argument("--strategies", metavar="A,B,...",
                   help="comma-separated strategies (default: the config's)")
    p.add_argument("--tune", action="store_true",
                   help="give every strategy the same small grid of its own hyper-parameters "
                        "(the search: section: learning rate for all, l2sp_alpha, the policy's "
                        "learning rate and tuned budget), pick each on the validation score of "
                        "finetune.monitor (AUC; or LogLoss) and report "
                        "the test metrics of the picks (grid.csv, picks.json)")
    p.add_argument("--targets", metavar="A,B,...",
                   help="comma-separated target domains, each in turn the target with the "
                        "other listed domains (and the data's own target) joining the source; "
                        "prints each target's table "
                        "and a summary across targets (default: the config's targets)")
    p.add_argument("--resume", nargs="?", const="latest", metavar="RUN_DIR",
                   help="continue an interrupted comparison: its run directory, or the latest "
                        "one of this config")
    p.add_argument("--keep-models", action="store_true",
                   help="save every run's model (model.pt, model.json) for `predict`")

    p = sub.add_parser("predict", help="probabilities for new rows with a saved model",
                       description="Score new rows with a fine-tuned model: the rows are "
                                   "encoded with the run's saved feature map (unseen values -> "
                                   "OOV, the trained bucket edges), and --out gets the --keep "
                                   "columns and one 'probability' per input row. No experiment "
                                   "YAML is needed: the run directory is self-contained.",
                       epilog=EPILOGS["predict"], formatter_class=fmt)
    p.add_argument("--run", required=True, metavar="DIR",
                   help="a finetune run directory (or a model folder of a compare run made "
                        "with --keep-models)")
    p.add_argument("--data", required=True, metavar="FILE", help="CSV, TSV or Parquet rows")
    p.add_argument("--out", "-o", required=True, metavar="FILE",
                   help="the predictions file: CSV, or Parquet / TSV / gzip by its name "
                        "(.parquet, .tsv, .gz)")
    p.add_argument("--keep", metavar="A,B,...",
                   help="input columns copied to --out (default: every column that is not a "
                        "feature or the label); --keep '' keeps none")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--sep", metavar="CHAR",
                   help="the field separator of a CSV --data file (default: the run's "
                        "data.csv_sep; tab for a .tsv file); --sep '\\t' for tabs")
    p.add_argument("--backend", metavar="NAME",
                   help="gated-embedding backend (default: auto, the first of cpu, cuda, "
                        "triton, reference available on the device)")
    p.add_argument("--device", metavar="DEV", default="cpu", help="cpu (default), cuda, cuda:N")
    p.add_argument("--threads", type=int, metavar="N",
                   help="torch CPU threads (default: cores minus the load average, at least 1)")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")

    p = sub.add_parser("bench", help="benchmarks: `bench ops` (the op), `bench train` (training)",
                       description="Benchmarks; the arguments go to autoft_fast.bench.",
                       epilog=EPILOGS["bench"], formatter_class=fmt, add_help=False)
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="e.g. ops --help")
    return parser


class _UserError(Exception):
    """Raised for wrong command-line usage; printed in one line."""


def default_threads() -> tuple[int, str]:
    """(threads, why): the cores this process may use minus the 1-minute load average
    (rounded), at least 1, so that a busy machine is not oversubscribed (on 2 cores with
    one busy process, torch's default of one thread per core ran the demo 10x slower
    than 1 thread).

    Example:
        >>> default_threads()   # doctest: +SKIP
        (1, '2 cores, load average 1.2')
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):  # not on every platform
        return cores, f"{cores} cores"
    return max(1, cores - round(load)), f"{cores} cores, load average {load:.1f}"


def _out_of_memory(e: BaseException) -> str | None:
    """The one-line message of an allocation failure (torch's or Arrow's), else None."""
    text = str(e)
    if isinstance(e, MemoryError) or type(e).__name__ in ("OutOfMemoryError", "ArrowMemoryError") \
            or (isinstance(e, RuntimeError) and ("can't allocate memory" in text
                                                 or "out of memory" in text.lower())):
        first = text.splitlines()[0] if text else type(e).__name__
        return (f"out of memory: {first[:300]} (a smaller model, batch_size or table, or "
                f"fewer --threads, needs less)")
    return None


def _os_error_message(e: OSError) -> str:
    """One line for an OSError: a write refused by a read-only or full disk names the file
    and the settings that choose where the tool writes."""
    import errno
    full = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
    if e.filename is not None and e.errno in (errno.EROFS, *full):
        disk = "full" if e.errno in full else "read-only"
        return (f"cannot write {str(e.filename)!r} ({e.strerror}: the disk is {disk}); the "
                "run folder (run_dir or --run-dir), the cache (cache_dir: generated data, "
                "processed data, pre-trained models) and --out must be on a writable disk "
                "with room")
    text = str(e)
    return text.splitlines()[0] if text else type(e).__name__


def _set_threads(args) -> str | None:
    """Apply --threads or the default; returns the line logged at the start of a run."""
    import torch
    threads = getattr(args, "threads", None)
    if threads is not None:
        from .train.progress import check_threads
        check_threads(threads, "--threads")
        why = "--threads"
    else:
        threads, why = default_threads()
    torch.set_num_threads(threads)
    return (f"threads: {threads} ({why}; OpenMP wait policy "
            f"{os.environ.get('OMP_WAIT_POLICY', 'default').lower()})")


def _load(args):
    from .config import load_config
    config = getattr(args, "config", None)
    resume = getattr(args, "resume", None)
    if config is None and resume not in (None, "latest"):
        # --resume RUN_DIR without --config continues that run under the config it recorded
        # (its config.yaml: the effective settings of its latest start, paths absolute), not
        # under the embedded demo config.
        recorded = Path(resume) / "config.yaml"
        if (Path(resume) / "run.json").is_file() and recorded.is_file():
            config = args.config = str(recorded)
    cfg = load_config(config)
    strategies = None
    if getattr(args, "strategies", None) is not None:
        strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
        if not strategies:
            raise _UserError(f"--strategies {args.strategies!r} names no strategy; give them "
                             "comma-separated (e.g. finetune_all,autoft), or leave the option "
                             "out for the config's")
    cfg = cfg.with_overrides(backend=getattr(args, "backend", None),
                             seeds=getattr(args, "seeds", None),
                             run_dir=getattr(args, "run_dir", None), strategies=strategies,
                             device=getattr(args, "device", None),
                             targets=getattr(args, "targets", None))
    cfg.torch_device()  # an unavailable device fails now, before any data is read
    if cfg.autoft.backend != "auto":  # and so does a backend the device lacks
        from .ops import registry
        registry.resolve(cfg.autoft.backend, cfg.torch_device())
    return cfg


def _start_run(cfg, command: str, args, extra: dict | None = None,
               run_dir: Path | None = None) -> Path:
    import yaml

    from ._io import write_text_atomic
    from .train.distributed import is_main_process
    from .train.progress import setup_logging
    from .train.runner import make_run_dir
    resumed = run_dir is not None
    run_dir = run_dir or make_run_dir(cfg, command)
    main = is_main_process()  # torchrun: rank 0 alone writes the log and the run's files
    try:
        setup_logging(run_dir / "log.txt" if main else None,
                      verbose=getattr(args, "verbose", False), console=main)
    except OSError as e:
        where = ("a resumed run folder must be writable: copy it to a writable disk and "
                 "--resume the copy" if resumed else "choose a writable folder with --run-dir")
        raise _UserError(f"cannot write {str(run_dir / 'log.txt')!r} ({e.strerror or e}); "
                         f"{where}") from None
    log = logging.getLogger("autoft_fast")
    if getattr(args, "threads_line", None):
        log.info("%s", args.threads_line)
    log.info("backend: %s on %s", cfg.resolved_backend(), cfg.torch_device())
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if main and not resumed:
        meta = {"command": command, "config": str(getattr(args, "config", None) or "<demo>"),
                "training_config_hash": _training_hash(cfg),
                "argv": getattr(args, "argv", sys.argv[1:]), "started": now, **(extra or {})}
        (run_dir / "run.json").write_text(json.dumps(meta, indent=2))
    elif main:
        # A resume may add seeds or strategies: run.json lists each resume's command line.
        meta = _read_run_json(run_dir)
        meta.setdefault("resumed", []).append({"argv": getattr(args, "argv", sys.argv[1:]),
                                               "at": now})
        if (extra or {}).get("keep_models"):
            # --keep-models given on a resume holds for every later resume too.
            meta["keep_models"] = True
        write_text_atomic(json.dumps(meta, indent=2), run_dir / "run.json")
    if main:
        # The effective config of the latest start (defaults filled in, backend 'auto'
        # resolved to the one used): with a resume's seeds and strategies.
        write_text_atomic(yaml.safe_dump(cfg.to_dict(resolve_backend=True), sort_keys=False),
                          run_dir / "config.yaml")
    return run_dir


def _training_hash(cfg) -> str:
    # What a checkpoint depends on; seeds and strategies may change between resumes (a
    # comparison can be extended), everything else may not.
    from .config import config_hash
    return config_hash(cfg.training_dict())


def _find_resume_dir(cfg, command: str, value: str, match: dict, accept=None) -> Path:
    """The run folder ``--resume value`` names ("latest": the newest run of ``command`` with
    the same training config, ``match``ing run.json and passing ``accept(folder)``, which
    raises _UserError to refuse it)."""
    if value != "latest":
        d = Path(value)
        if not (d / "run.json").is_file():
            raise _UserError(f"--resume {value!r} is not a run directory (no run.json in it)")
        meta = _read_run_json(d)
        if meta.get("command") != command:
            raise _UserError(f"--resume {value!r} is a {meta.get('command')!r} run, not {command!r}")
        for k, v in match.items():
            if meta.get(k) != v:
                raise _UserError(f"--resume {value!r} ran {k} {_shown(meta.get(k))}, not "
                                 f"{_shown(v)}")
        if meta.get("training_config_hash") != _training_hash(cfg):
            raise _UserError(f"--resume {value!r}: the config's data, model, pretrain, finetune "
                             "or autoft section changed since that run started"
                             + _changes_since(cfg, d) + " (the data "
                             "files count by their absolute paths: a moved project or data "
                             "folder counts as a change)")
        return d
    prefix = cfg.name if cfg.name == command else f"{cfg.name}-{command}"
    cands = [d for d in Path(cfg.run_dir).glob(f"{prefix}-*") if (d / "run.json").is_file()]
    refused = None  # the newest run of this config that ``accept`` refused, and why
    for d in sorted(cands, key=lambda d: (d / "run.json").stat().st_mtime, reverse=True):
        try:
            meta = json.loads((d / "run.json").read_text())
        except (OSError, ValueError):
            meta = None
        if not isinstance(meta, dict):
            import warnings
            warnings.warn(f"--resume: skipped {str(d)!r}: its run.json could not be read "
                          "(damaged); name a run folder to resume with --resume RUN_DIR",
                          UserWarning, stacklevel=2)
            continue
        if (meta.get("command") == command and all(meta.get(k) == v for k, v in match.items())
                and meta.get("training_config_hash") == _training_hash(cfg)):
            if accept is not None:
                try:
                    accept(d)
                except _UserError as e:
                    refused = refused or (d, str(e))
                    continue
            return d
    if refused is not None:
        # Same config, another shape (--tune, --targets): say which, not "differs".
        raise _UserError(f"{refused[1]} (the newest {command} run of this config: "
                         f"{str(refused[0])!r})")
    same = [d for d in cands if _meta(d).get("command") == command]
    if same:
        newest = max(same, key=lambda d: (d / "run.json").stat().st_mtime)
        ran = _meta(newest)
        what = [f"{k} {_shown(ran.get(k))} -> {_shown(v)}" for k, v in match.items()
                if ran.get(k) != v]
        raise _UserError(
            f"--resume: no earlier {command} run of {cfg.name!r} under {cfg.run_dir} has this "
            f"config; the newest, {str(newest)!r}, differs"
            + (_changes_since(cfg, newest, extra=what) or " in its data, model, pretrain, "
               "finetune or autoft section, or in what it ran")
            + ". A resume continues the same settings: run without --resume to start afresh")
    raise _UserError(f"--resume: no earlier {command} run of {cfg.name!r} under {cfg.run_dir}")


def _with_run_cache(cfg, run_dir: Path):
    """(cfg, note): on a resume whose cache_dir names no folder while the run's own cache (its
    config.yaml, absolute) exists, the run's cache, so a relative cache_dir or run_dir given
    from another working directory finds the run's generated data and pre-trained model
    instead of building them again elsewhere; the note says so (None when nothing changed)."""
    import dataclasses

    import yaml
    try:
        saved = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return cfg, None
    if not isinstance(saved, dict):
        return cfg, None
    recorded = saved.get("cache_dir")
    if recorded is None and isinstance(saved.get("run_dir"), str):
        recorded = str(Path(saved["run_dir"]) / "cache")
    if not isinstance(recorded, str) or not Path(recorded).is_absolute():
        return cfg, None
    ours, theirs = Path(cfg.cache_dir).resolve(), Path(recorded)
    if ours == theirs or ours.exists() or not theirs.is_dir():
        return cfg, None
    note = (f"--resume: using the run's own cache {str(theirs)!r}: this start's cache_dir "
            f"{str(ours)!r} does not exist (relative run_dir and cache_dir follow the working "
            "directory)")
    return dataclasses.replace(cfg, cache_dir=theirs, cache_dir_given=True), note


def _shown(v) -> str:
    """A run.json value as a user would write it: 'healthcare,lawyer', 'none', 'on'."""
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v)) or "none"
    return repr(v)


def _read_run_json(d: Path) -> dict:
    """The run.json of the run folder ``d``, or a _UserError naming it when it is damaged
    (a resume must not guess what the run was)."""
    path = Path(d) / "run.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise _UserError(f"--resume: {str(path)!r} could not be read "
                         f"({getattr(e, 'strerror', None) or e}); it records what the run "
                         "ran, so the run cannot be continued: start a new one without "
                         "--resume") from None
    if not isinstance(meta, dict):
        raise _UserError(f"--resume: {str(path)!r} is not a run record (a JSON object); "
                         "start a new run without --resume")
    return meta


def _meta(d: Path) -> dict:
    try:
        meta = json.loads((d / "run.json").read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _changes_since(cfg, run_dir: Path, most: int = 5, extra: list | None = None) -> str:
    """': finetune.epochs 3 -> 4, ...' for the training settings that differ between ``cfg``
    and the config.yaml of ``run_dir``; '' when that file cannot be read or nothing differs
    (the data files' content, say)."""
    from .config import load_config

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    keys = cfg.training_dict()
    try:
        old = flat(load_config(run_dir / "config.yaml").training_dict())
        # config.yaml holds the backend 'auto' resolved to: compare with this one's resolved
        new = flat({k: v for k, v in cfg.to_dict(resolve_backend=True).items() if k in keys})
    except Exception:  # an unreadable or older config file: no details, the refusal stands
        return ""
    diffs = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
             if old.get(k) != new.get(k)]
    diffs += extra or []
    if not diffs:
        return ""
    more = f" (and {len(diffs) - most} more)" if len(diffs) > most else ""
    return ": " + ", ".join(diffs[:most]) + more


def _progress(args):
    return False if getattr(args, "no_progress", False) else None


def _compare_shape(cfg, args) -> dict:
    """What a comparison's folder layout and tables depend on beyond the training config:
    recorded in run.json, and a resume must match it."""
    return {"targets": cfg.targets and list(cfg.targets),
            "tune": bool(getattr(args, "tune", False))}


def _check_compare_resume(run_dir: Path, shape: dict, value: str) -> dict:
    """Refuse to resume a comparison of other targets or another --tune setting (it would
    write a different experiment's tables into that folder); returns the run's run.json."""
    meta = _read_run_json(run_dir)
    recorded = {k: meta[k] for k in shape if k in meta}
    # A run.json written before these were recorded: what the folder shows (a comparison of
    # several targets keeps each target's outputs in a folder of its own).
    if "targets" not in recorded:
        several = (run_dir / "summary.md").is_file() or any(
            (d / "pretrain.json").is_file() or (d / "runs").is_dir()
            for d in run_dir.iterdir() if d.is_dir() and d.name not in ("runs", "search"))
        recorded["targets"] = "several (see the run folder)" if several else None
    if "tune" not in recorded:
        recorded["tune"] = any(run_dir.rglob("picks.json"))
    for key, now in shape.items():
        if key in recorded and recorded[key] != now:
            was = recorded[key]
            how = {"targets": (f"pass --targets {','.join(was)}" if isinstance(was, list)
                               else "leave out --targets (and the config's targets:)"
                               if was is None else "pass the run's --targets"),
                   "tune": "pass --tune" if was else "leave out --tune"}[key]
            shown_was = was if isinstance(was, str) and " " in was else _shown(was)
            raise _UserError(f"--resume {value!r} ran {key} {shown_was}, not {_shown(now)}; "
                             f"{how} to continue that run, or start a new one without --resume")
    return meta


def _cmd_compare(args, demo: bool = False) -> int:
    from .train.runner import compare
    cfg = _load(args)
    run_dir = None
    shape = _compare_shape(cfg, args)
    keep_models = bool(getattr(args, "keep_models", False))
    inherited = False
    cache_note = None
    if getattr(args, "resume", None):
        # "latest": the newest run of the same shape; a named folder must have it.
        run_dir = _find_resume_dir(cfg, "compare", args.resume, {},
                                   lambda d: _check_compare_resume(d, shape, args.resume))
        meta = _check_compare_resume(run_dir, shape, args.resume)
        cfg, cache_note = _with_run_cache(cfg, run_dir)
        # The runs made so far kept their models: the rest do too.
        inherited = bool(meta.get("keep_models")) and not keep_models
        keep_models = keep_models or inherited
    command = "demo" if demo else "compare"
    run_dir = _start_run(cfg, command, args, run_dir=run_dir,
                         extra={**shape, "keep_models": keep_models})
    if cache_note:
        logging.getLogger("autoft_fast").info("%s", cache_note)
    if inherited:
        logging.getLogger("autoft_fast").info("--resume: keeping every run's model, as the run did")
    t0 = time.perf_counter()
    table, rows, runs = compare(cfg, run_dir, resume=run_dir is not None and bool(
        getattr(args, "resume", None)), tune=bool(getattr(args, "tune", False)),
        progress=_progress(args), keep_models=keep_models)
    print(table)
    targets = f" x {len(cfg.targets)} targets" if cfg.targets and len(cfg.targets) > 1 else ""
    written = ", ".join(sorted(p.name for p in run_dir.iterdir() if p.is_file()))
    print(f"\n{_count(len(cfg.strategies), 'strategy', 'strategies')} x "
          f"{_count(len(cfg.seeds), 'seed')}{targets} in {time.perf_counter() - t0:.1f} s; {written}")
    print(f"run directory: {run_dir}")
    return 0


def _cmd_demo(args) -> int:
    args.config = None
    args.strategies = None
    args.resume = None
    return _cmd_compare(args, demo=True)


def _cmd_generate(args) -> int:
    from .config import load_config
    from .train.progress import setup_logging
    from .train.runner import generate_data
    cfg = load_config(args.config)
    setup_logging(None)
    if not args.out.strip():
        raise _UserError("--out is empty; give the directory to write the data set into")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise _UserError(f"--out {args.out!r} is a file; give a directory")
    taken = sorted(p.name for p in out.glob("*")
                   if p.name in GENERATED_FILES) if out.is_dir() else []
    if taken and not args.force:
        raise _UserError(f"--out {args.out!r} already holds {', '.join(taken)}; pass --force "
                         "to overwrite them, or choose another directory")
    try:
        path = generate_data(cfg, out)
    except OSError as e:  # a read-only or full disk, a file in the way: name --out, not a temp
        raise _UserError(f"--out {args.out!r} cannot be written ({e.strerror or e}); choose a "
                         "writable directory") from None
    print(f"dataset YAML: {path}")
    print(f"output directory: {out.resolve()}")
    return 0


# What `generate` writes into --out (checked before anything is overwritten).
GENERATED_FILES = ("synthetic.csv", "synthetic.parquet", "dataset.yaml", "ground_truth.json")


def _cmd_pretrain(args) -> int:
    from .train.progress import setup_logging
    from .train.runner import load_data, load_pretrained, pretrain, pretrained_path, write_json
    cfg = _load(args)
    setup_logging(None, verbose=getattr(args, "verbose", False))
    bundle = load_data(cfg)
    if not args.force:
        path = pretrained_path(cfg, bundle)
        cached = load_pretrained(path)
        if cached is not None:  # nothing is trained, so no run directory is made
            info = cached["info"]
            print(f"pre-trained {info['model']['name']} already cached: source valid AUC "
                  f"{info['valid_auc']:.4f}, LogLoss {info['valid_logloss']:.4f}")
            print(f"model: {path}")
            print("no new run directory (nothing was trained); --force retrains")
            setup_logging(None, verbose=getattr(args, "verbose", False))  # no log to keep
            return 0
    run_dir = _start_run(cfg, "pretrain", args)
    _, info = pretrain(cfg, bundle, force=args.force, progress=_progress(args))
    write_json(info, run_dir / "pretrain.json")
    print(f"pre-trained {info['model']['name']}: source valid AUC {info['valid_auc']:.4f}, "
          f"LogLoss {info['valid_logloss']:.4f}")
    print(f"model: {info['path']}")
    print(f"run directory: {run_dir}")
    return 0


def _cmd_finetune(args) -> int:
    from .config import resolve_strategies
    from .train.runner import check_run_data, load_data, pretrain, run_strategy, write_json
    cfg = _load(args)
    strategy = resolve_strategies([args.strategy])[0]
    seed = args.seed
    if seed is None and args.resume not in (None, "latest"):
        # --resume RUN_DIR continues that run's seed unless --seed names another.
        ran = _meta(Path(args.resume)).get("seed")
        seed = ran if isinstance(ran, int) and not isinstance(ran, bool) else None
    seed = cfg.seeds[0] if seed is None else seed
    if seed < 0:
        raise _UserError(f"--seed must be >= 0, got {seed}")
    run_dir, cache_note = None, None
    if args.resume:
        run_dir = _find_resume_dir(cfg, "finetune", args.resume,
                                   {"strategy": strategy, "seed": seed})
        cfg, cache_note = _with_run_cache(cfg, run_dir)
    run_dir = _start_run(cfg, "finetune", args, {"strategy": strategy, "seed": seed}, run_dir)
    if cache_note:
        logging.getLogger("autoft_fast").info("%s", cache_note)
    bundle = load_data(cfg)
    check_run_data(run_dir, bundle, resume=bool(args.resume))
    state = None
    if strategy != "target_only":
        state, info = pretrain(cfg, bundle, progress=_progress(args))
        write_json(info, run_dir / "pretrain.json")
    rec = run_strategy(cfg, bundle, state, strategy, seed, run_dir / "run",
                       resume=bool(args.resume), keep_model=True, progress=_progress(args))
    print(f"{strategy} (seed {seed}): test AUC {rec['auc']:.4f}, LogLoss {rec['logloss']:.4f}")
    stats = rec.get("policy_stats") or {}
    for kind in ("field", "layer"):
        if stats.get(kind):
            fr = ", ".join(f"{k} {v:.2f}" for k, v in stats[kind].items())
            print(f"tuned fraction per {kind}: {fr}")
    print(f"run directory: {run_dir}")
    return 0


def _cmd_bench(args) -> int:
    rest = list(args.bench_args)
    if not rest or rest[0] in ("-h", "--help"):
        print("usage: autoft-fast bench {ops,train} [options]   (autoft-fast bench ops --help)\n"
              "  ops    time the gated-embedding op per backend\n"
              "  train  training samples/s of a strategy per backend")
        return 0 if rest else 2
    if rest[0] == "train":
        from .train import bench as train_bench
        return int(train_bench.main(rest[1:]) or 0)
    if rest[0] != "ops":
        raise _UserError(f"unknown benchmark {rest[0]!r}; available: ops, train")
    from . import bench  # the benchmark harness pulls in optional kernels; import on demand
    return int(bench.main(rest[1:]) or 0)


def _count(n: int, one: str, many: str | None = None) -> str:
    """'1 seed', '3 seeds', '1,000 rows'."""
    return f"{n:,} {one if n == 1 else (many or one + 's')}"


def _cmd_predict(args) -> int:
    from .train.distributed import world
    from .train.predict import load_run
    from .train.progress import setup_logging
    if world().size > 1:
        # Every rank would score the whole file and write --out: one process does it all.
        raise _UserError("predict runs in one process: run `autoft-fast predict ...` without "
                         f"torchrun (this run has WORLD_SIZE = {world().size})")
    log = setup_logging(None)
    if args.threads_line:
        log.info("%s", args.threads_line)
    out = Path(args.out)
    keep = None
    if args.keep is not None:
        keep = [c.strip() for c in args.keep.split(",") if c.strip()]
    t0 = time.perf_counter()
    run = load_run(args.run, device=args.device, backend=args.backend)
    log.info("model: %s (%s) from %s", run.strategy, run.info["model"]["name"], run.path)
    sep = args.sep
    if sep is not None:
        sep = {"\\t": "\t", "tab": "\t"}.get(sep, sep)  # a shell passes '\t' as two characters
        if len(sep) != 1:
            raise _UserError(f"--sep must be one character (or '\\t' for a tab), got {args.sep!r}")
    n = run.predict_file(args.data, out, keep, force=args.force, sep=sep)
    print(f"{_count(n, 'row')} scored in {time.perf_counter() - t0:.1f} s -> {out}")
    return 0


COMMANDS = {"demo": _cmd_demo, "generate": _cmd_generate, "pretrain": _cmd_pretrain,
            "finetune": _cmd_finetune, "compare": _cmd_compare, "predict": _cmd_predict,
            "bench": _cmd_bench}

# What the interruption message adds per command: only finetune and compare have --resume;
# pretrain continues from its cached checkpoint when run again; the rest start afresh.
INTERRUPTED_HINT = {"finetune": " (resume with --resume)", "compare": " (resume with --resume)",
                    "pretrain": " (run it again to continue from its last finished epoch)"}

# Commands whose thread count is set (and printed) by main; bench chooses its own.
THREADED = ("demo", "pretrain", "finetune", "compare", "predict")


def main(argv: list[str] | None = None) -> int:
    """Entry point of `autoft-fast`; returns the exit status (0 ok, 2 bad input).

    Example:
        >>> main(["compare", "--config", "my.yaml", "--seeds", "2"])  # doctest: +SKIP
        0
    """
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # everything after `bench` (--help included) is bench's
        args = argparse.Namespace(command="bench", bench_args=argv[1:], debug=False)
    else:
        args = parser.parse_args(argv)
    args.argv = argv  # the command line run.json records
    from .config import ConfigError
    from .train.checkpoint import CheckpointError
    from .train.progress import log_to_file, setup_logging
    setup_logging(None, verbose=getattr(args, "verbose", False))  # no earlier run's log file
    import warnings
    previous = warnings.showwarning
    warnings.showwarning = _show_warning
    try:
        args.threads_line = _set_threads(args) if args.command in THREADED else None
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        log_to_file(logging.ERROR, "interrupted")
        print(f"{PROG}: interrupted{INTERRUPTED_HINT.get(args.command, '')}", file=sys.stderr)
        return 130
    except (ConfigError, _UserError, ValueError, CheckpointError, OSError) as e:
        # FileNotFoundError, PermissionError, a read-only disk: all OSErrors.
        if isinstance(e, OSError):
            msg = _os_error_message(e)
        else:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        log_to_file(logging.ERROR, "error: %s", msg, exc_info=e)
        if getattr(args, "debug", False):
            raise
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return 2
    except BaseException as e:  # a bug: the traceback goes to log.txt and the terminal
        msg = _out_of_memory(e)
        if msg is not None and not getattr(args, "debug", False):
            log_to_file(logging.ERROR, "error: %s", msg, exc_info=e)
            print(f"{PROG}: error: {msg}", file=sys.stderr)
            return 2
        log_to_file(logging.ERROR, "failed: %s", e, exc_info=e)
        raise
    finally:
        warnings.showwarning = previous


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """The package's own warnings as one line, `autoft-fast: warning: ...` (no source path),
    and into the run's log; anything else as Python shows it."""
    from .train.progress import log_to_file
    if issubclass(category, UserWarning) and "autoft_fast" in str(filename):
        log_to_file(logging.WARNING, "warning: %s", message)
        print(f"{PROG}: warning: {message}", file=sys.stderr if file is None else file)
        return
    import warnings
    (sys.stderr if file is None else file).write(
        warnings.formatwarning(message, category, filename, lineno, line))


if __name__ == "__main__":
    sys.exit(main())
