"""Bad input: every kind stops setup with one clear message naming file, record and field, or (on_bad_row: skip)
is skipped, counted by kind and listed with an example in the audit report."""

import json

import pytest

from dpo_lightning.errors import DataError

from fixtures.data_cases import chat_rows, explicit_rows, hh_rows
from helpers import make_datamodule

BAD_AT = 2  # the bad record's position: the third of 5 records, named "line 3" as an editor and `sed -n 3p` do


def _line(row) -> bytes:
    return (json.dumps(row) + "\n").encode()


def _explicit(**overrides) -> bytes:
    row = dict(explicit_rows(1, seed=9)[0])
    for key, value in overrides.items():
        if value is _DROP:
            row.pop(key)
        else:
            row[key] = value
    return _line(row)


_DROP = object()
HUGE = "x" * 1_100_000  # a 1 MB field: data.max_field_chars (250,000) stops it before tokenization
CHAT_BAD_ROLE = chat_rows(1, seed=9)[0]
CHAT_BAD_ROLE = dict(CHAT_BAD_ROLE, chosen=[CHAT_BAD_ROLE["chosen"][0], {"role": "robot", "content": "beep"}])

# case -> (format, the bad line, kind, field named in the message)
CASES = {
    "malformed_json": ("explicit", b'{"prompt": "a", "chosen": \n', "malformed_json", None),
    "not_an_object": ("explicit", b'"just a string"\n', "not_an_object", None),
    "non_utf8": ("explicit", b'{"prompt": "caf\xe9 \xff", "chosen": " a", "rejected": " b"}\n', "not_utf8", None),
    "wrong_type_number": ("explicit", _explicit(chosen=3), "not_a_string", "chosen"),
    "wrong_type_list": ("explicit", _explicit(rejected=["x"]), "not_a_string", "rejected"),
    "missing_field": ("explicit", _explicit(rejected=_DROP), "missing_field", "rejected"),
    "null": ("explicit", _explicit(prompt=None), "missing_field", "prompt"),
    "empty_string": ("explicit", _explicit(chosen=""), "empty_response", "chosen"),
    "chosen_equals_rejected": (
        "explicit",
        _explicit(chosen=" same", rejected=" same"),
        "identical_responses",
        "chosen",
    ),
    "one_mb_row": ("explicit", _explicit(chosen=HUGE), "too_long", "chosen"),
    "hh_no_assistant_turn": (
        "hh",
        _line({"chosen": "\n\nHuman: hi there", "rejected": "\n\nHuman: hi there"}),
        "no_assistant_turn",
        "chosen",
    ),
    "hh_prompts_differ": (
        "hh",
        _line({"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"}),
        "hh_prompt_mismatch",
        "rejected",
    ),
    "chat_unknown_role": ("chat", _line(CHAT_BAD_ROLE), "unknown_role", "chosen[1].role"),
}
GOOD = {"explicit": explicit_rows, "hh": hh_rows, "chat": chat_rows}


def _write(tmp_path, case) -> tuple:
    fmt, bad_line, kind, field = CASES[case]
    good = [_line(r) for r in GOOD[fmt](4)]
    path = tmp_path / f"{case}.jsonl"
    path.write_bytes(b"".join(good[:BAD_AT] + [bad_line] + good[BAD_AT:]))
    return path, fmt, kind, field


def _dm(path, tokenizer, **kwargs):
    return make_datamodule(path, tokenizer, **{"format": "auto", **kwargs})


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_record_stops_setup_naming_file_record_and_field(tmp_path, tiny_tokenizer, case):
    path, fmt, kind, field = _write(tmp_path, case)
    with pytest.raises(DataError) as err:
        _dm(path, tiny_tokenizer, format=fmt).setup()
    message = str(err.value)
    assert message.startswith(f"{path}, line {BAD_AT + 1}")
    if field:
        assert f", field {field!r}:" in message
    else:  # unreadable lines have no field, and the line is named once
        assert ", field" not in message and message.count("line ") == 1
    assert f"({kind}: 1)" in message and "data.on_bad_row=skip" in message
    assert "\n" not in message and len(message) < 600, "one short paragraph"


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_record_is_skipped_and_counted(tmp_path, tiny_tokenizer, case):
    path, fmt, kind, field = _write(tmp_path, case)
    dm = _dm(path, tiny_tokenizer, format=fmt, on_bad_row="skip")
    dm.setup()
    assert dm.skipped["train"] == {kind: 1}
    assert len(dm.datasets["train"]) + len(dm.datasets["val"]) == 4
    audit = dm.report["splits"]["train"]
    assert audit["records"] == 5 and audit["bad_records"] == 1
    example = audit["bad_by_kind"][kind]["examples"][0]
    assert example["where"] == f"{path}, line {BAD_AT + 1}" and example["field"] == (field or "")
    assert dm.report["violations"] == []


def test_bad_row_rate_threshold_fails_fast(tmp_path, tiny_tokenizer):
    path, fmt, *_ = _write(tmp_path, "empty_string")
    dm = _dm(path, tiny_tokenizer, format=fmt, on_bad_row="skip", max_bad_row_rate=0.1)
    with pytest.raises(DataError, match=r"train bad-record rate 0.200 > data.max_bad_row_rate 0.1"):
        dm.setup()


def test_type_clash_in_auto_format_is_a_bad_record_not_a_crash(tmp_path, tiny_tokenizer):
    """A number where other records hold strings makes pyarrow read the column as JSON; the record is reported."""
    path, *_ = _write(tmp_path, "wrong_type_number")
    with pytest.raises(DataError, match=r"line 3, field 'chosen': field 'chosen' should be a string, got int"):
        _dm(path, tiny_tokenizer).setup()


def test_empty_missing_and_unsupported_files(tmp_path, tiny_tokenizer):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match=r"empty.jsonl: the file holds no records"):
        _dm(tmp_path / "empty.jsonl", tiny_tokenizer).setup()
    with pytest.raises(DataError, match=r"train: data file .*nope.jsonl does not exist"):
        _dm(tmp_path / "nope.jsonl", tiny_tokenizer).setup()
    (tmp_path / "data.txt").write_text("hello")
    with pytest.raises(DataError, match=r"data.txt: unsupported file type"):
        _dm(tmp_path / "data.txt", tiny_tokenizer).setup()
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match=r"folder: the folder holds no"):
        _dm(tmp_path / "folder", tiny_tokenizer).setup()


def test_malformed_json_document_and_non_utf8_csv_name_the_line(tmp_path, tiny_tokenizer):
    (tmp_path / "doc.json").write_text('[\n{"prompt": "a", "chosen": " b", "rejected": " c"},\n{"prompt": \n]')
    with pytest.raises(DataError, match=r"doc.json, line 4, column 1: malformed JSON"):
        _dm(tmp_path / "doc.json", tiny_tokenizer).setup()
    (tmp_path / "bad.csv").write_bytes(b"prompt,chosen,rejected\na, b, c\nd, \xff\xfe, f\n")
    with pytest.raises(DataError, match=r"bad.csv, line 3: bytes that are not UTF-8"):
        _dm(tmp_path / "bad.csv", tiny_tokenizer).setup()


def test_bad_record_in_second_file_of_a_folder_names_that_file(tmp_path, tiny_tokenizer):
    folder = tmp_path / "parts"
    folder.mkdir()
    (folder / "a.jsonl").write_bytes(b"".join(_line(r) for r in explicit_rows(3)))
    (folder / "b.jsonl").write_bytes(_line(explicit_rows(1)[0]) + b"{oops\n")
    with pytest.raises(DataError) as err:
        _dm(folder, tiny_tokenizer, format="explicit").setup()
    assert str(err.value).startswith(f"{folder / 'b.jsonl'}, line 2: not valid JSON")


def test_unknown_column_mapping_names_the_columns_there_are(tmp_path, tiny_tokenizer):
    from dpo_lightning.errors import ConfigError

    path = tmp_path / "d.jsonl"
    path.write_bytes(b"".join(_line(r) for r in explicit_rows(3)))
    dm = _dm(path, tiny_tokenizer, columns={"prompt": "instruction", "chosen": "chosen", "rejected": "rejected"})
    with pytest.raises(ConfigError, match=r"maps to column 'instruction', which is not there; the columns are prompt"):
        dm.setup()


def test_bad_records_are_named_as_an_editor_counts(tmp_path, tiny_tokenizer):
    """1-based everywhere, one number per message: the JSONL line as `sed -n Np` prints it (blank lines counted),
    the row of a CSV (the header not counted) or Parquet file, the record of a JSON document; in the error of
    on_bad_row: error and in the audit's examples alike (CSV reads "" as null: missing_field there)."""
    import datasets

    rows = explicit_rows(5)
    bad = dict(rows[3], chosen="")  # the fourth record
    jsonl = tmp_path / "blank_lines.jsonl"
    jsonl.write_bytes(b"\n" + b"".join(_line(r) for r in rows[:3]) + b"\n" + _line(bad) + _line(rows[4]))
    assert jsonl.read_text().splitlines()[6 - 1] == json.dumps(bad)  # `sed -n 6p`: the bad record is line 6
    datasets.Dataset.from_list([*rows[:3], bad, rows[4]]).to_csv(str(tmp_path / "t.csv"), index=False)
    datasets.Dataset.from_list([*rows[:3], bad, rows[4]]).to_parquet(str(tmp_path / "t.parquet"))
    (tmp_path / "doc.json").write_text(json.dumps([*rows[:3], bad, rows[4]], indent=1))
    for path, where in (
        (jsonl, "line 6"),
        (tmp_path / "t.csv", "row 4"),
        (tmp_path / "t.parquet", "row 4"),
        (tmp_path / "doc.json", "record 4"),
    ):
        with pytest.raises(DataError) as err:
            _dm(path, tiny_tokenizer, format="explicit").setup()
        assert str(err.value).startswith(f"{path}, {where}, field 'chosen': field 'chosen' is "), err.value
    dm = _dm(jsonl, tiny_tokenizer, format="explicit", on_bad_row="skip")
    dm.setup()
    assert dm.report["splits"]["train"]["bad_by_kind"]["empty_response"]["examples"][0]["where"] == f"{jsonl}, line 6"
