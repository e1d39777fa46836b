"""The unlabeled queries the frozen LLM answers: read every source of `spec.data`, keep the usable rows, mix.

A source is a jsonl, json (a list of records), parquet, csv or tsv file, or a Hugging Face dataset (format hf,
online only). Its text is one field (`text_field`) or several joined by a `template` such as Alpaca's
"{instruction}\\n{input}", or the user message of a single-turn chat (`messages_field`, e.g. the Tulu-3 SFT
mixture). A row whose text is missing, not a string, not a single-turn chat, empty, or longer than
`data.max_query_chars` is skipped and counted, never fatal; so is an exact duplicate when `data.dedup` is on.

Selection is deterministic: the same spec and files give the same queries in the same order, so that their
position (the query id) can name shards of the stage outputs across restarts. With `data.limit`, sources share
the limit in proportion to their weights (a source short of its share leaves the rest to the others); the
final order is shuffled with `data.seed`, so any prefix of the queries mixes all sources.

A source with `response_field` also gives each query's answer (the official generations, McGill-NLP/llm2vec-gen-tulu):
a row whose answer is missing or not a string is skipped like a bad query, and the answers travel with their queries
through sampling, mixing and shuffling (QuerySelection.responses).

Relative paths resolve against the current working directory (the repository root when run as documented).
"""

from __future__ import annotations

import csv
import hashlib
import json
import string
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from components.spec import DataSourceSpec, DataSpec

# Why a row can be skipped, in the order the checks run.
SKIP_REASONS = ("malformed", "missing_field", "not_string", "not_single_turn", "empty", "too_long", "duplicate")

_SUFFIX_FORMATS = {
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".tsv": "tsv"
}


class DataError(ValueError):
    """A data source cannot be read or yields no queries; the message names the spec key."""


@dataclass
class SourceReport:
    """What happened to one source's rows."""

    key: str  # data.sources[i]
    path: str
    rows: int = 0
    skipped: Counter = field(default_factory=Counter)
    usable: int = 0
    selected: int = 0

    def to_dict(self) -> dict[str, Any]:
        skipped = {reason: self.skipped[reason] for reason in SKIP_REASONS if self.skipped[reason]}
        return {"source": self.key, "path": self.path, "rows": self.rows, "skipped": skipped,
                "usable": self.usable, "selected": self.selected}


@dataclass(frozen=True)
class QuerySelection:
    """The selected queries; a query's id is its position."""

    texts: list[str]
    report: list[SourceReport]
    responses: list[str] | None = None  # the given answers, one per text (sources with response_field)

    def table(self) -> pa.Table:
        ids = pa.array(range(len(self.texts)), pa.int64())
        columns = {"id": ids, "query": pa.array(self.texts, pa.string())}
        if self.responses is not None:
            columns["response"] = pa.array(self.responses, pa.string())
        return pa.table(columns)

    def digest(self) -> str:
        """A hash of the texts (and given answers) in order: the same digest gives the same stage outputs."""
        digest = hashlib.sha256()
        for text in self.texts:
            digest.update(text.encode())
            digest.update(b"\0")
        for response in self.responses or ():
            digest.update(response.encode())
            digest.update(b"\1")
        return digest.hexdigest()

    def report_dict(self) -> dict[str, Any]:
        skipped = Counter()
        for source in self.report:
            skipped.update(source.skipped)
        return {
            "selected": len(self.texts),
            "skipped": {reason: skipped[reason] for reason in SKIP_REASONS if skipped[reason]},
            "sources": [source.to_dict() for source in self.report],
        }

    def describe(self) -> str:
        lines = [f"{len(self.texts)} queries selected"]
        for source in self.report:
            skipped = ", ".join(f"{n} {reason}" for reason, n in source.to_dict()["skipped"].items()) or "none"
            lines.append(f"  {source.key} {source.path}: {source.rows} rows, skipped {skipped}; "
                         f"{source.usable} usable, {source.selected} selected")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- loading


def load_queries(data: DataSpec) -> QuerySelection:
    """Read, check, de-duplicate, sample and mix the sources of `data` (see the module docstring)."""
    if not data.sources:
        raise DataError("data.sources: no sources given; add at least one {path, text_field} entry")
    seen: set[str] = set()
    usable: list[list] = []  # per source: query texts, or (query, given answer) pairs
    reports: list[SourceReport] = []
    for index, source in enumerate(data.sources):
        key = f"data.sources[{index}]"
        report = SourceReport(key=key, path=source.path)
        texts = []
        for record in read_records(source, key):
            report.rows += 1
            text, reason = query_text(record, source, data.max_query_chars)
            answer = None
            if reason is None and source.response_field is not None:
                answer, reason = given_response(record, source.response_field)
            if reason is None and data.dedup:
                reason = "duplicate" if text in seen else None
                seen.add(text)
            if reason is None:
                texts.append(text if answer is None else (text, answer))
            else:
                report.skipped[reason] += 1
        texts = _sample(texts, source.limit, data.seed, index)
        report.usable = len(texts)
        usable.append(texts)
        reports.append(report)
    quotas = mix_quotas([len(texts) for texts in usable], [s.weight for s in data.sources], data.limit)
    chosen: list[str] = []
    for index, (texts, quota) in enumerate(zip(usable, quotas, strict=True)):
        picked = _sample(texts, quota, data.seed, index + len(usable))
        reports[index].selected = len(picked)
        chosen += picked
    if not chosen:
        summary = "; ".join(f"{r.key}: {r.rows} rows, skipped {dict(r.skipped)}" for r in reports)
        raise DataError(f"data: no usable queries ({summary})")
    order = np.random.default_rng([data.seed, 1]).permutation(len(chosen))
    chosen = [chosen[i] for i in order]
    if data.given_responses:
        return QuerySelection(texts=[text for text, _ in chosen], report=reports, responses=[a for _, a in chosen])
    return QuerySelection(texts=chosen, report=reports)


def given_response(record: dict, field: str) -> tuple[str | None, str | None]:
    """(answer, None), or (None, why the row is skipped): a given answer must be a string (it may be empty: an empty
    answer is kept with its query, as a generated one would be, and the train stage leaves it out)."""
    if field not in record:
        return None, "missing_field"
    if not isinstance(record[field], str):
        return None, "not_string"
    return record[field].strip(), None


def mix_quotas(available: list[int], weights: list[float], limit: int | None) -> list[int]:
    """How many rows each source gives: all without a limit, else shares of `limit` in proportion to weight.

    A source with fewer rows than its share gives all it has, and the rest is shared again among the others.
    """
    if limit is None or limit >= sum(available):
        return list(available)
    quotas = [0] * len(available)
    open_sources = [i for i, n in enumerate(available) if n > 0]
    remaining = limit
    while remaining > 0 and open_sources:
        total = sum(weights[i] for i in open_sources)
        shares = {i: remaining * weights[i] / total for i in open_sources}
        grant = {i: min(int(shares[i]), available[i] - quotas[i]) for i in open_sources}
        # Largest remainders get the rows that rounding down left over, so the quotas sum to the limit.
        leftover = remaining - sum(grant.values())
        for i in sorted(open_sources, key=lambda i: shares[i] - int(shares[i]), reverse=True):
            if leftover and grant[i] < available[i] - quotas[i]:
                grant[i] += 1
                leftover -= 1
        for i, n in grant.items():
            quotas[i] += n
        remaining = limit - sum(quotas)
        open_sources = [i for i in open_sources if quotas[i] < available[i]]
    return quotas


def _sample(texts: list[str], count: int | None, seed: int, stream: int) -> list[str]:
    """`count` of `texts` drawn without replacement, kept in file order; all of them when count is None."""
    if count is None or count >= len(texts):
        return texts
    keep = np.sort(np.random.default_rng([seed, 0, stream]).choice(len(texts), size=count, replace=False))
    return [texts[i] for i in keep]


def query_text(record: Any, source: DataSourceSpec, max_chars: int) -> tuple[str | None, str | None]:
    """(text, None) for a usable row, else (None, why it is skipped: one of SKIP_REASONS)."""
    if not isinstance(record, dict):
        return None, "malformed"
    if source.messages_field is not None:
        return _single_turn_query(record, source.messages_field, max_chars)
    names = [source.text_field] if source.text_field is not None else template_fields(source.template)
    for name in names:
        if name not in record:
            return None, "missing_field"
        if not isinstance(record[name], str):
            return None, "not_string"
    text = record[source.text_field] if source.text_field is not None else source.template.format_map(record)
    text = text.strip()
    if not text:
        return None, "empty"
    if len(text) > max_chars:
        return None, "too_long"
    return text, None


def _single_turn_query(record: dict, field: str, max_chars: int) -> tuple[str | None, str | None]:
    """The user message of a conversation of exactly [user, assistant] messages (the Tulu-3 SFT mixture's rows)."""
    if field not in record:
        return None, "missing_field"
    messages = record[field]
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        return None, "malformed"
    if [m.get("role") for m in messages] != ["user", "assistant"]:
        return None, "not_single_turn"
    text = messages[0].get("content")
    if not isinstance(text, str):
        return None, "not_string"
    text = text.strip()
    if not text:
        return None, "empty"
    if len(text) > max_chars:
        return None, "too_long"
    return text, None


def source_columns(source: DataSourceSpec) -> list[str]:
    """The fields a source's text rule reads (the only columns worth reading from a wide file)."""
    answers = [source.response_field] if source.response_field is not None else []
    if source.messages_field is not None:
        return [source.messages_field, *answers]
    texts = [source.text_field] if source.text_field is not None else template_fields(source.template)
    return texts + answers


def template_fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


# ------------------------------------------------------------------------------------------------ reading


def source_format(source: DataSourceSpec, key: str) -> str:
    if source.format != "auto":
        return source.format
    suffix = Path(source.path).suffix.lower()
    if suffix not in _SUFFIX_FORMATS:
        raise DataError(f"{key}.format: cannot tell the format of '{source.path}' from its suffix '{suffix}'; "
                        f"set format to one of jsonl, json, parquet, csv, tsv, hf")
    return _SUFFIX_FORMATS[suffix]


def resolve_path(source: DataSourceSpec, key: str) -> Path:
    path = Path(source.path).expanduser()
    path = path if path.is_absolute() else Path.cwd() / path
    if not path.is_file():
        raise DataError(f"{key}.path: file not found: {path}")
    return path


def read_records(source: DataSourceSpec, key: str) -> Iterator[Any]:
    """The rows of one source as they come (dicts, or anything else for a malformed row)."""
    kind = source_format(source, key)
    if kind == "hf":
        yield from _read_hf(source, key)
        return
    path = resolve_path(source, key)
    try:
        if kind == "jsonl":
            with open(path, encoding="utf-8") as handle:
                for line in handle:
                    if line.strip():
                        yield _parse_json_line(line)
        elif kind == "json":
            records = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(records, list):
                raise DataError(f"{key}.path: {path} holds a JSON {type(records).__name__}, expected a list of records "
                                "(use format jsonl for one record per line)")
            yield from records
        elif kind == "parquet":
            import pyarrow.parquet as pq

            # Batch by batch, and only the columns the text rule reads: a million-row chat file (the Tulu-3 SFT
            # mixture) never becomes Python objects all at once.
            parquet = pq.ParquetFile(path)
            columns = [name for name in source_columns(source) if name in parquet.schema_arrow.names]
            for batch in parquet.iter_batches(batch_size=4096, columns=columns or None):
                yield from batch.to_pylist()
        else:
            with open(path, encoding="utf-8-sig", newline="") as handle:
                # Rows with more fields than the header keep the extras under None, which no text rule names.
                yield from csv.DictReader(handle, delimiter="\t" if kind == "tsv" else ",")
    except (UnicodeDecodeError, json.JSONDecodeError, csv.Error, pa.ArrowException) as err:
        raise DataError(f"{key}.path: cannot read {path} as {kind}: {err}") from None


def _parse_json_line(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None  # counted as malformed, like any other unusable row


def _read_hf(source: DataSourceSpec, key: str) -> Iterator[Any]:
    try:
        import datasets

        dataset = datasets.load_dataset(source.path, source.subset, split=source.split or "train")
    except Exception as err:  # noqa: BLE001 - offline, unknown name, missing split: all reported the same way
        raise DataError(f"{key}.path: cannot load Hugging Face dataset '{source.path}' "
                        f"(subset {source.subset}, split {source.split or 'train'}): {err}. Offline? "
                        "Use a local file instead.") from None
    yield from dataset
