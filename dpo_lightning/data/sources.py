"""Where the records come from: local files, folders of them, or a dataset on the Hugging Face hub.

One ``datasets.load_dataset`` call per file (JSONL, JSON, Parquet, CSV; ``.gz``/``.bz2``/``.xz``/``.zst`` too)
or per hub spec (``{path: Anthropic/hh-rlhf, data_dir: harmless-base, split: test}``, the same kwargs as
``load_dataset``), remembering which global row came from which file so that errors can name both.

When pyarrow cannot read a JSON file (a malformed line, bytes that are not UTF-8, a line that is not an
object), the file is scanned line by line: each unreadable record is replaced by a placeholder carrying a
``LOAD_ERROR`` (kind, field, message) and the cleaned copy is loaded instead, so record numbers stay those of
the file and the bad records are reported, or skipped and counted, like any other bad row.

Records are named the way an editor (and ``sed -n 13p``) counts them, from 1: ``file, line 13`` in JSON Lines
(blank lines counted, as the file holds them), ``file, record 13`` in a JSON document holding a list, and
``file, row 13`` in CSV (the header not counted) and Parquet files and hub datasets (``Source.where``).
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO

import datasets
from datasets.fingerprint import Hasher
from lightning.pytorch.utilities import rank_zero_info

from dpo_lightning.data.cache import cache_dir
from dpo_lightning.data.formats import LOAD_ERROR
from dpo_lightning.errors import DataError

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
STRING = datasets.Value("string")
COMPRESSIONS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open, ".zst": None}


def _builder(path: Path) -> str | None:
    suffixes = [s for s in path.suffixes if s not in COMPRESSIONS]
    return BUILDERS.get(suffixes[-1]) if suffixes else None


def builder_of(path: Path) -> str:
    """The ``load_dataset`` builder for a file (``json``, ``parquet``, ``csv``), or a ``DataError``."""
    builder = _builder(path)
    if builder is None:
        raise DataError(
            f"{path}: unsupported file type; use one of {', '.join(BUILDERS)} (optionally compressed with "
            f"{', '.join(COMPRESSIONS)}) or a folder of them"
        )
    return builder


def expand(files: list[str]) -> list[Path]:
    """Files as given, and the data files inside any folder (recursively, sorted, hidden ones left out)."""
    out: list[Path] = []
    for name in files:
        path = Path(name)
        if not path.is_dir():
            builder_of(path)
            out.append(path)
            continue
        found = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and _builder(p)
            and not any(part.startswith((".", "_")) for part in p.relative_to(path).parts)
        )
        if not found:
            raise DataError(f"{path}: the folder holds no {', '.join(BUILDERS)} files")
        out.extend(found)
    return out


def _open_binary(path: Path) -> BinaryIO:
    opener = COMPRESSIONS.get(path.suffix, open)
    if opener is None:
        raise DataError(f"{path}: could not be read, and .zst files cannot be scanned for the bad record")
    return opener(path, "rb")


def json_lines(raw: bytes) -> list[tuple[int, bytes]] | None:
    """The records of a JSON Lines file as (1-based line number, line), blank lines skipped as ``datasets`` skips
    them; ``None`` for a JSON document holding a list of records."""
    if raw.lstrip()[:1] == b"[":
        return None
    return [(number, line) for number, line in enumerate(raw.split(b"\n"), start=1) if line.strip()]


def scan_json(path: Path) -> tuple[list[str], list[tuple[int, str]]]:
    """Read a JSON/JSONL file record by record: (one JSON text per record, [(record, problem)]).

    A problem is ``"kind\\tfield\\tmessage"``; its record's text is a placeholder object carrying it.
    """
    with _open_binary(path) as f:
        raw = f.read()
    numbered = json_lines(raw)
    if numbered is None:  # one JSON document holding a list of records
        try:
            records = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            line = raw[: err.start].count(b"\n") + 1
            raise DataError(f"{path}, line {line}: bytes that are not UTF-8; re-encode the file as UTF-8") from None
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path}, line {err.lineno}, column {err.colno}: malformed JSON ({err.msg}); a JSON document that "
                "does not parse cannot be skipped record by record (JSON Lines can)"
            ) from None
        lines = [json.dumps(r) for r in records] if isinstance(records, list) else []
    else:
        lines = [line for _, line in numbered]
    texts, problems = [], []
    for record, line in enumerate(lines):
        problem = None
        try:
            text = line.decode("utf-8") if isinstance(line, bytes) else line
            value = json.loads(text)
            if not isinstance(value, dict):
                problem = f"not_an_object\t\tthe record is a JSON {type(value).__name__}, not a {{...}} object"
        except UnicodeDecodeError as err:
            problem = (
                f"not_utf8\t\tbytes that are not UTF-8 ({line[err.start : err.start + 4]!r} at byte "
                f"{err.start + 1} of the line); re-encode the file as UTF-8"
            )
        except json.JSONDecodeError as err:
            problem = f"malformed_json\t\tnot valid JSON ({err.msg} at column {err.colno})"
        if problem:
            problems.append((record, problem))
            text = json.dumps({LOAD_ERROR: problem})
        texts.append(text)
    return texts, problems


def _first_non_utf8_line(path: Path) -> int | None:
    with _open_binary(path) as f:
        for number, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                return number
    return None


def load_file(path: Path) -> datasets.Dataset:
    """One file as a ``datasets.Dataset`` (cached by ``datasets``), unreadable JSON records as placeholders."""
    builder = _builder(path)
    try:
        dataset = datasets.load_dataset(builder, data_files=str(path), split="train")
        if builder != "parquet":
            dataset.data.table.validate(full=True)  # pyarrow's JSON reader can let bytes that are not UTF-8 in
        return dataset
    except Exception as err:  # noqa: BLE001 - pyarrow/pandas fail in many types; find the record below
        error = f"{type(err).__name__}: {err}"
    if builder == "json":
        texts, problems = scan_json(path)
        if not texts:
            raise DataError(f"{path}: the file holds no records")
        if problems:
            stat = path.stat()
            key = Hasher.hash([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
            cleaned = cache_dir("cleaned") / f"{key}.jsonl"
            if not cleaned.exists():
                with tempfile.NamedTemporaryFile("w", dir=cleaned.parent, delete=False, encoding="utf-8") as tmp:
                    tmp.write("\n".join(texts) + "\n")
                os.replace(tmp.name, cleaned)  # atomic: ranks of a multi-process run may race here
            try:
                return datasets.load_dataset("json", data_files=str(cleaned), split="train")
            except Exception as err:  # noqa: BLE001
                error = f"{type(err).__name__}: {err}"
    elif builder == "csv" and (line := _first_non_utf8_line(path)) is not None:
        raise DataError(f"{path}, line {line}: bytes that are not UTF-8; re-encode the file as UTF-8") from None
    raise DataError(f"{path}: could not be read as {builder} ({error})")


def load_hub(spec: dict[str, Any], what: str, context: str = "") -> datasets.Dataset:
    """``datasets.load_dataset(**spec)``; the spec must name a split (or the dataset must have only one)."""
    try:
        loaded = datasets.load_dataset(**spec)
    except Exception as err:  # noqa: BLE001 - any hub failure becomes one clear message
        raise DataError(
            f"{what}: {context or 'the dataset '}{spec} could not be loaded ({type(err).__name__}: {err}). Point "
            f"data.{what}_files at local files, or check the name, config and split."
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        if len(loaded) != 1:
            raise DataError(f"{what}: {spec} has splits {', '.join(loaded)}; add split: <one of them>")
        loaded = next(iter(loaded.values()))
    return loaded


class Source:
    """The records of one split, concatenated from one or more files, remembering which row came from where.

    Args:
        spec: a file, a folder, a list of them, or a dict of ``load_dataset`` kwargs (a hub dataset).
        what: the split name, for messages (``train``/``val``).
        hub_fallback: ``load_dataset`` kwargs used when the local files do not exist.
    """

    def __init__(self, spec: str | list[str] | dict[str, Any], what: str, hub_fallback: dict[str, Any] | None = None):
        self.offsets: list[tuple[int, str]] = []  # (first global row, file name)
        self._lines: dict[str, list[int] | None] = {}  # JSON Lines file -> line number of each record
        if isinstance(spec, dict):
            self.dataset = load_hub(spec, what)
            self.offsets = [(0, f"hub:{spec.get('path')}")]
            return
        files = [spec] if isinstance(spec, str) else list(spec)
        if not files:
            raise DataError(f"data.{what}_files is empty")
        missing = [f for f in files if not Path(f).exists()]
        if missing and hub_fallback:
            rank_zero_info(f"{what}: {missing[0]} not found; loading the hub dataset {hub_fallback}")
            self.dataset = load_hub(hub_fallback, what, f"{missing[0]} does not exist, and the hub fallback ")
            self.offsets = [(0, f"hub:{hub_fallback.get('path')}")]
            return
        if missing:
            raise DataError(f"{what}: data file {missing[0]} does not exist")
        parts: list[datasets.Dataset] = []
        for path in expand(files):
            part = load_file(path)
            if len(part) == 0:
                raise DataError(f"{path}: the file holds no records")
            self.offsets.append((sum(len(p) for p in parts), str(path)))
            parts.append(part)
        self.dataset = parts[0] if len(parts) == 1 else self._concatenate(parts)

    def _concatenate(self, parts: list[datasets.Dataset]) -> datasets.Dataset:
        """One dataset from the files' parts; parts whose types differ only in representation (CSV reads
        ``large_string`` where JSON reads ``string``) are cast to the first part's types."""
        columns = set().union(*(p.column_names for p in parts))
        if LOAD_ERROR in columns:  # placeholders of unreadable records exist in some files only
            parts = [
                p if LOAD_ERROR in p.column_names else p.add_column(LOAD_ERROR, [None] * len(p), feature=STRING)
                for p in parts
            ]
        first, cast = parts[0], [parts[0]]
        for (_, name), part in zip(self.offsets[1:], parts[1:], strict=True):
            if part.features != first.features:
                try:
                    part = part.cast(first.features)
                except (ValueError, TypeError, KeyError):
                    raise DataError(
                        f"{name} and {self.offsets[0][1]} hold different columns or types "
                        f"({dict(part.features)} vs {dict(first.features)}); one split's files must share a schema"
                    ) from None
            cast.append(part)
        return datasets.concatenate_datasets(cast)

    def file(self, row: int = 0) -> str:
        """The file (or ``hub:<name>``) holding a global row."""
        return self._part(row)[1]

    def where(self, row: int) -> str:
        """A global row number named as an editor counts, from 1: 'file, line N' in JSON Lines, 'file, record N' in
        a JSON document (a list), 'file, row N' in CSV (after the header), Parquet and hub datasets."""
        start, name = self._part(row)
        n = row - start  # 0-based within the file
        if name.startswith("hub:") or _builder(Path(name)) != "json":
            return f"{name}, row {n + 1}"
        if name not in self._lines:
            try:
                with _open_binary(Path(name)) as f:
                    numbered = json_lines(f.read())
                self._lines[name] = None if numbered is None else [number for number, _ in numbered]
            except (OSError, DataError):  # a .zst file, or gone since: count records instead
                self._lines[name] = None
        lines = self._lines[name]
        return f"{name}, line {lines[n]}" if lines is not None and n < len(lines) else f"{name}, record {n + 1}"

    def _part(self, row: int) -> tuple[int, str]:
        return max((o for o in self.offsets if o[0] <= row), key=lambda o: o[0])
