"""Query loading: formats, text rules, skipped rows counted by reason, mixing by weight, determinism."""

from __future__ import annotations

import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from components.queries import DataError, load_queries, mix_quotas
from components.spec import DataSpec


def data(*sources: dict, **options) -> DataSpec:
    return DataSpec.model_validate({"sources": list(sources), **options})


def write_jsonl(path, records) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def test_bad_rows_are_skipped_and_counted_by_reason(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [
        {"q": "first question"}, {"q": "  "}, {"q": 7}, {"other": "x"}, "{not json", {"q": "x" * 101},
        {"q": "first question"}, {"q": "  second question  "},
    ])
    selection = load_queries(data({"path": path, "text_field": "q"}, max_query_chars=100))

    assert sorted(selection.texts) == ["first question", "second question"]
    report = selection.report_dict()
    assert report["skipped"] == {"malformed": 1, "missing_field": 1, "not_string": 1, "empty": 1, "too_long": 1,
                                 "duplicate": 1}
    assert report["sources"][0]["rows"] == 8 and report["sources"][0]["selected"] == 2


def test_dedup_off_keeps_exact_duplicates(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"q": "same"}, {"q": "same"}])
    assert load_queries(data({"path": path, "text_field": "q"}, dedup=False)).texts == ["same", "same"]


def test_template_joins_fields_and_duplicates_across_sources_are_dropped(tmp_path):
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([
        {"instruction": "Translate", "input": "bonjour", "output": "-"},
        {"instruction": "Tell a joke", "input": "", "output": "-"},
        {"instruction": "Sum", "input": None, "output": "-"},
    ]))
    other = write_jsonl(tmp_path / "other.jsonl", [{"text": "Tell a joke"}, {"text": "Another"}])
    selection = load_queries(data(
        {"path": str(alpaca), "template": "{instruction}\n{input}"}, {"path": other, "text_field": "text"}
    ))

    assert sorted(selection.texts) == ["Another", "Tell a joke", "Translate\nbonjour"]
    first, second = selection.report_dict()["sources"]
    assert first["skipped"] == {"not_string": 1} and second["skipped"] == {"duplicate": 1}


def test_csv_tsv_and_parquet_sources_are_read(tmp_path):
    (tmp_path / "a.csv").write_text("\ufefftext,label\nfrom csv,1\n\"with, comma\",2\n")
    (tmp_path / "b.tsv").write_text("id\ttext\n1\tfrom tsv\textra field\n")
    pq.write_table(pa.table({"text": ["from parquet", None]}), tmp_path / "c.parquet")
    selection = load_queries(data(*[{"path": str(tmp_path / name), "text_field": "text"}
                                    for name in ("a.csv", "b.tsv", "c.parquet")]))

    assert sorted(selection.texts) == ["from csv", "from parquet", "from tsv", "with, comma"]
    assert selection.report_dict()["skipped"] == {"not_string": 1}


def test_real_files_resolve_relative_to_the_working_directory():
    selection = load_queries(data(
        {"path": "../shared/data/nq_open/NQ-open.dev.jsonl", "text_field": "question", "limit": 20},
        {"path": "../shared/data/alpaca_en_demo/alpaca_en_demo.json", "template": "{instruction}\n{input}",
         "limit": 20},
    ))
    assert len(selection.texts) == 40 and all(text == text.strip() and text for text in selection.texts)


def test_missing_file_error_names_the_key_and_the_resolved_path(tmp_path):
    good = write_jsonl(tmp_path / "q.jsonl", [{"q": "a"}])
    with pytest.raises(DataError, match=r"data\.sources\[1\]\.path: file not found: .*/nope\.jsonl"):
        load_queries(data({"path": good, "text_field": "q"}, {"path": str(tmp_path / "nope.jsonl"), "text_field": "q"}))


def test_unknown_suffix_and_no_usable_rows_are_clear_errors(tmp_path):
    (tmp_path / "q.txt").write_text("hello\n")
    with pytest.raises(DataError, match=r"data\.sources\[0\]\.format: cannot tell"):
        load_queries(data({"path": str(tmp_path / "q.txt"), "text_field": "q"}))
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"q": ""}])
    with pytest.raises(DataError, match="no usable queries"):
        load_queries(data({"path": empty, "text_field": "q"}))
    with pytest.raises(DataError, match="data.sources: no sources"):
        load_queries(data())


def test_weights_share_the_limit_and_a_short_source_leaves_its_rest_to_the_others(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"q": f"a{i}"} for i in range(100)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"q": f"b{i}"} for i in range(100)])
    short = write_jsonl(tmp_path / "s.jsonl", [{"q": f"s{i}"} for i in range(5)])

    mixed = load_queries(data({"path": a, "text_field": "q", "weight": 1}, {"path": b, "text_field": "q", "weight": 3},
                              limit=40))
    assert Counter(text[0] for text in mixed.texts) == {"a": 10, "b": 30}
    topped_up = load_queries(data({"path": short, "text_field": "q"}, {"path": b, "text_field": "q"}, limit=40))
    assert Counter(text[0] for text in topped_up.texts) == {"s": 5, "b": 35}
    assert mix_quotas([3, 3, 3], [1, 1, 1], 7) == [3, 2, 2] and mix_quotas([3, 3], [1, 1], None) == [3, 3]


def test_selection_is_deterministic_for_a_seed_and_mixes_sources_in_its_order(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"q": f"a{i}"} for i in range(50)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"q": f"b{i}"} for i in range(50)])
    spec = {"sources": [{"path": a, "text_field": "q"}, {"path": b, "text_field": "q"}], "limit": 30}

    first, again = load_queries(data(**spec, seed=1)), load_queries(data(**spec, seed=1))
    other = load_queries(data(**spec, seed=2))
    assert first.texts == again.texts and first.digest() == again.digest()
    assert first.texts != other.texts and first.digest() != other.digest()
    assert {text[0] for text in first.texts[:10]} == {"a", "b"}  # shuffled, not one source after the other
