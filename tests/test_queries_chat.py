"""Queries from a chat dataset's single-turn conversations (the Tulu-3 SFT mixture's layout), read from Parquet
batch by batch."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from components.queries import load_queries
from components.spec import DataSourceSpec, DataSpec


def turn(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def test_only_single_turn_conversations_give_queries_and_the_rest_are_counted(tmp_path):
    conversations = [
        [turn("user", "What is rain?"), turn("assistant", "Water falling.")],
        [turn("user", "Hi"), turn("assistant", "Hello"), turn("user", "More?"), turn("assistant", "Sure")],  # multi-turn
        [turn("system", "Be brief."), turn("user", "Why?"), turn("assistant", "Because.")],  # not exactly user+assistant
        [turn("user", "   "), turn("assistant", "...")],  # empty query
        [turn("user", "What is rain?"), turn("assistant", "Again.")],  # duplicate query
        [turn("user", "x" * 50), turn("assistant", "long")],  # too long for max_query_chars 40
        [turn("user", "Name a colour."), turn("assistant", "Blue.")],
    ] * 3000  # 21,000 rows: several Parquet batches
    path = tmp_path / "tulu.parquet"
    table = pa.table({"id": [f"row-{i}" for i in range(len(conversations))], "messages": conversations,
                      "source": ["synthetic"] * len(conversations)})
    pq.write_table(table, path, row_group_size=5000)
    data = DataSpec(sources=[DataSourceSpec(path=str(path), messages_field="messages")], max_query_chars=40)
    selection = load_queries(data)
    assert sorted(selection.texts) == ["Name a colour.", "What is rain?"]
    report = selection.report_dict()
    assert report["skipped"] == {"not_single_turn": 6000, "empty": 3000, "too_long": 3000, "duplicate": 3000 * 2 + 2998}
    assert report["sources"][0]["rows"] == 21000


def test_a_file_without_the_messages_column_counts_every_row_as_missing_it(tmp_path):
    path = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"]}), path)
    data = DataSpec(sources=[DataSourceSpec(path=str(path), messages_field="messages")])
    with pytest.raises(ValueError, match="no usable queries.*'missing_field': 2"):
        load_queries(data)


def test_messages_field_replaces_text_field_and_template():
    with pytest.raises(ValueError, match="exactly one of text_field, template and messages_field"):
        DataSourceSpec(path="a.parquet", messages_field="messages", text_field="prompt")
