"""File writes that a kill can never leave half-done (shared by the data cache and the trainer),
and the one YAML reader of the package (duplicate keys are an error, not a silent overwrite)."""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import torch
import yaml

__all__ = ["save_atomic", "write_text_atomic", "load_yaml", "DuplicateKeyError",
           "remove_stale_temps", "umask_mode", "current_umask"]


def umask_mode(fd: int) -> None:
    """Give a file made by ``tempfile.mkstemp`` (mode 0600) the mode a plain ``open`` would
    give it (0666 less the umask), so that files renamed from it into place can be shared as
    any other output."""
    os.fchmod(fd, 0o666 & ~current_umask())


def current_umask() -> int:
    # Read, not set-and-restore, where Linux says it (os.umask would change it process-wide
    # for a moment, under every other thread's file creations).
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_atomic(obj, path: str | os.PathLike) -> Path:
    """Write `obj` with torch.save so that `path` holds either the old or the new file,
    never a truncated one: write a temporary file in the same directory, fsync it, then
    os.replace it over `path` (atomic on POSIX) and fsync the directory entry.

    Example:
        >>> save_atomic({"epoch": 3}, "/tmp/ckpt.pt")  # doctest: +ELLIPSIS
        PosixPath('/tmp/ckpt.pt')
    """
    return _write_atomic(path, "wb", lambda f: torch.save(obj, f))


def write_text_atomic(text: str, path: str | os.PathLike) -> Path:
    """Write `text` (UTF-8) to `path` as atomically as :func:`save_atomic` writes a tensor
    file: a reader sees the old or the new content, never part of it.

    Example:
        >>> write_text_atomic('{"auc": 0.7}', "/tmp/result.json")  # doctest: +ELLIPSIS
        PosixPath('/tmp/result.json')
    """
    return _write_atomic(path, "w", lambda f: f.write(text))


def _write_atomic(path, mode: str, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask_mode(fd)
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if "b" not in mode else {})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # A failed or interrupted write must not leave temp files behind either.
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:  # some filesystems refuse fsync on directories; the data is safe anyway
        pass
    return path


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A YAML mapping names the same key twice (YAML itself would keep the last value)."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: SafeLoader's own error follows
                    continue
                if first is not None:
                    raise DuplicateKeyError(
                        None, None,
                        f"key {key!r} is given twice (lines {first + 1} and "
                        f"{key_node.start_mark.line + 1}); keep one", key_node.start_mark)
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _construct_int(loader, node):
    # YAML 1.1 (PyYAML) reads 010 as octal 8, 1:30 as base 60 (90) and 0b11 as binary; YAML
    # 1.2 and every reader of "epochs: 010" would not. Refused, with both readings.
    text = str(node.value).replace("_", "")
    body = text.lstrip("+-")
    if ":" in body or body[:2].lower() == "0b" or (len(body) > 1 and body[0] == "0"
                                                   and body[1].isdigit()):
        value = yaml.SafeLoader.construct_yaml_int(loader, node)
        raise yaml.constructor.ConstructorError(
            None, None, f"{node.value} is read by YAML 1.1 as the number {value} (a leading 0 "
            "is octal, a ':' base 60, 0b binary), likely not what was meant: write the number "
            f"without that form, or quote it for text ('{node.value}')", node.start_mark)
    return yaml.SafeLoader.construct_yaml_int(loader, node)


_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def load_yaml(stream):
    """Parse YAML text or an open file like yaml.safe_load, but a key given twice in one
    mapping raises DuplicateKeyError (a yaml.YAMLError) naming the key and its lines.

    Example:
        >>> load_yaml("a: 1\nb: 2")
        {'a': 1, 'b': 2}
        >>> load_yaml("a: 1\na: 2")  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        DuplicateKeyError: key 'a' is given twice (lines 1 and 2); keep one
    """
    return yaml.load(stream, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)


def read_yaml_file(path: str | os.PathLike, label: str, error=ValueError):
    """Parse the YAML file ``path`` (duplicate keys refused, see :func:`load_yaml`); every
    problem is one ``error`` naming the file as ``label`` ('config file', 'data: file').

    Example:
        >>> read_yaml_file("exp.yaml", "config file")  # doctest: +SKIP
        {'synthetic': {}, 'seeds': [0]}
    """
    from pathlib import Path
    path = Path(path)
    if path.is_dir():
        raise error(f"{label} {str(path)!r} is a directory; give the YAML file in it")
    if not path.is_file():
        raise error(f"{label} {str(path)!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            return load_yaml(f)
    except yaml.YAMLError as e:
        raise error(f"{label} {str(path)!r} is not valid YAML: {yaml_problem(e)}") from None
    except UnicodeDecodeError as e:
        raise error(f"{label} {str(path)!r} is not UTF-8 text: {e}") from None


def yaml_problem(e: "yaml.YAMLError") -> str:
    """One line for a YAML error: what is wrong and where (line and column, 1-based).

    Example:
        >>> try:
        ...     load_yaml("a: {b: 1\nc: 2\n")
        ... except yaml.YAMLError as e:
        ...     print(yaml_problem(e))
        while parsing a flow mapping (line 1, column 4): expected ',' or '}', but got ':' (line 2, column 2)
    """
    if isinstance(e, DuplicateKeyError):
        return e.problem
    context, problem = getattr(e, "context", None), getattr(e, "problem", None)
    if not problem:
        return str(e).splitlines()[0]

    def at(mark) -> str:
        return f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""

    head = f"{context}{at(getattr(e, 'context_mark', None))}: " if context else ""
    return f"{head}{problem}{at(getattr(e, 'problem_mark', None))}"


def remove_stale_temps(folder: str | os.PathLike, name: str, older_than: float = 0.0) -> int:
    """Delete the temporary files that a killed :func:`save_atomic` of ``folder/name`` left
    (``.name.*.tmp``) and that were last written more than ``older_than`` seconds ago;
    returns how many were removed. Where other processes may be writing ``name`` at the
    same moment (a shared cache), pass an age no live write takes.

    Example:
        >>> remove_stale_temps("runs/x/run", "last.pt")
        0
    """
    import time

    removed = 0
    now = time.time()
    for p in Path(folder).glob(f".{name}.*.tmp"):
        try:
            if older_than and now - p.stat().st_mtime < older_than:
                continue
            p.unlink()
            removed += 1
        except FileNotFoundError:
            pass
    return removed


def strict_json(obj):
    """``obj`` with every NaN or infinite float replaced by None: JSON has no such numbers
    (Python writes a bare NaN, which jq, JavaScript and most other readers refuse).

    Example:
        >>> strict_json({"auc": float("nan"), "n": [1.0, float("inf")]})
        {'auc': None, 'n': [1.0, None]}
    """
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj
