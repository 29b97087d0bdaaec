"""Unpaired preference data (KTO): the `unpaired` format, `data.unpair`, tokenization, UnpairedCollator, the
data module end to end (loaders, val split, label noise, audit) and the errors for data it cannot use."""

import json

import datasets
import pytest
import torch

from dpo_lightning.data import PreferenceDataModule
from dpo_lightning.data.formats import BadRow, apply_columns, detect_format, parse_unpaired
from dpo_lightning.data.tokenize import UnpairedCollator, prompt_ids, response_ids, truncate_row
from dpo_lightning.errors import DataError
from dpo_lightning.logps import IGNORE_INDEX

WORDS = ["great", "superb", "lovely", "awful", "dreadful", "boring", "fine", "dull"]


def _rows(n: int) -> list[dict]:
    """n unpaired rows, labels alternating true/false (every third one 1/0 numbers), completions of varied length."""
    rows = []
    for i in range(n):
        completion = " " + " ".join(WORDS[(i + k) % len(WORDS)] for k in range(1 + i % 4)) + "."
        label = bool(i % 2 == 0)
        rows.append({"prompt": f"Review {i}: The film was", "completion": completion, "label": label})
    return rows


def _pairs(n: int) -> list[dict]:
    return [
        {"prompt": f"Review {i}: The meal was", "chosen": " great" * (1 + i % 3) + ".", "rejected": " awful."}
        for i in range(n)
    ]


def _write(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def _dm(path, tokenizer, **kwargs) -> PreferenceDataModule:
    kwargs = {"max_length": 64, "max_prompt_length": 32, "val_fraction": 0.25, "batch_size": 4, **kwargs}
    dm = PreferenceDataModule(path, **kwargs)
    dm._tokenizer = tokenizer
    return dm


def _check_contract(batch: dict, features: list[dict]) -> None:
    """The batch is exactly UnpairedCollator's contract for these rows (no truncation of mismatched rows)."""
    n = len(features)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "desirable", "index"}
    width = batch["input_ids"].shape[1]
    for key in ("input_ids", "attention_mask", "labels"):
        assert batch[key].shape == (2 * n, width) and batch[key].dtype == torch.long
    assert batch["desirable"].dtype == torch.bool and batch["desirable"].tolist() == [
        bool(f["label"]) for f in features
    ]
    assert batch["index"].dtype == torch.long and batch["index"].tolist() == [f["index"] for f in features]
    for row in range(2 * n):
        i = row % n
        prompt = list(features[i]["prompt_input_ids"])
        completion = list(features[i if row < n else (i + 1) % n]["completion_input_ids"])
        length = len(prompt) + len(completion)
        assert batch["input_ids"][row, :length].tolist() == prompt + completion, row
        assert batch["attention_mask"][row].tolist() == [1] * length + [0] * (width - length), row
        assert batch["labels"][row].tolist() == [IGNORE_INDEX] * len(prompt) + completion + [IGNORE_INDEX] * (
            width - length
        ), row


# ------------------------------------------------------------------------------------------------ parsing
@pytest.mark.parametrize("label,expected", [(True, True), (False, False), (1, True), (0, False), (1.0, True)])
def test_parse_unpaired_accepts_booleans_and_0_1(label, expected):
    prompt, completion, desirable = parse_unpaired({"prompt": "Q?", "completion": " A.", "label": label})
    assert (prompt, completion) == ("Q?", " A.") and desirable is expected


@pytest.mark.parametrize(
    "row,kind,field",
    [
        ({"completion": " a", "label": True}, "missing_field", "prompt"),
        ({"prompt": "p", "label": True}, "missing_field", "completion"),
        ({"prompt": "p", "completion": None, "label": True}, "missing_field", "completion"),
        ({"prompt": "p", "completion": 3, "label": True}, "not_a_string", "completion"),
        ({"prompt": "p", "completion": "  ", "label": True}, "empty_response", "completion"),
        ({"prompt": "p", "completion": " a"}, "missing_field", "label"),
        ({"prompt": "p", "completion": " a", "label": None}, "missing_field", "label"),
        ({"prompt": "p", "completion": " a", "label": "true"}, "bad_label", "label"),
        ({"prompt": "p", "completion": " a", "label": 2}, "bad_label", "label"),
        ({"prompt": "p", "completion": " a", "label": 0.5}, "bad_label", "label"),
        ({"prompt": "p", "completion": " a", "label": [1]}, "bad_label", "label"),
    ],
)
def test_parse_unpaired_bad_rows(row, kind, field):
    with pytest.raises(BadRow) as err:
        parse_unpaired(row)
    assert (err.value.kind, err.value.field) == (kind, field)
    assert field in err.value.message


BAD_AT = 2
# a bad line at record 2 of an unpaired JSONL file -> (kind, field named in the message)
FILE_CASES = {
    "bad_label": ({"prompt": "p", "completion": " fine.", "label": "yes"}, "bad_label", "label"),
    "missing_label": ({"prompt": "p", "completion": " fine."}, "missing_field", "label"),
    "empty_completion": ({"prompt": "p", "completion": "", "label": True}, "empty_response", "completion"),
    "malformed_json": ('{"prompt": "p", "completion": ', "malformed_json", None),
}


def _bad_file(tmp_path, case) -> str:
    bad, _, _ = FILE_CASES[case]
    rows = _rows(8)
    return _write(tmp_path / f"{case}.jsonl", [*rows[:BAD_AT], bad, *rows[BAD_AT:]])


@pytest.mark.parametrize("case", sorted(FILE_CASES))
def test_unpaired_bad_record_stops_setup_naming_file_record_and_field(tmp_path, tiny_tokenizer, case):
    path = _bad_file(tmp_path, case)
    _, kind, field = FILE_CASES[case]
    with pytest.raises(DataError) as err:
        _dm(path, tiny_tokenizer, format="unpaired").setup()
    message = str(err.value)
    assert message.startswith(f"{path}, line {BAD_AT + 1}")  # 1-based, as an editor counts
    assert (f", field {field!r}:" in message) if field else (", field" not in message)
    assert f"({kind}: 1)" in message and "data.on_bad_row=skip" in message


@pytest.mark.parametrize("case", sorted(FILE_CASES))
def test_unpaired_bad_record_is_skipped_counted_and_audited(tmp_path, tiny_tokenizer, case):
    path = _bad_file(tmp_path, case)
    _, kind, field = FILE_CASES[case]
    dm = _dm(path, tiny_tokenizer, on_bad_row="skip")  # format auto: the good rows' columns say unpaired
    dm.setup()
    assert dm.formats["train"] == "unpaired" and dm.skipped["train"] == {kind: 1}
    assert len(dm.datasets["train"]) + len(dm.datasets["val"]) == 8
    assert BAD_AT not in set(dm.datasets["train"]["record"]) | set(dm.datasets["val"]["record"])
    audit = dm.report["splits"]["train"]
    assert audit["records"] == 9 and audit["bad_records"] == 1 and audit["rows"] == 8
    example = audit["bad_by_kind"][kind]["examples"][0]
    assert example["where"] == f"{path}, line {BAD_AT + 1}" and example["field"] == (field or "")


def test_unpair_bad_pair_is_named_by_its_record_not_its_row(tmp_path, tiny_tokenizer):
    """With data.unpair a record makes two rows, so row positions are not record numbers: the error must name
    the record (the fourth, line 4, after the first three made rows 0..5)."""
    pairs = _pairs(6)
    pairs[3]["rejected"] = pairs[3]["chosen"]
    path = _write(tmp_path / "pairs.jsonl", pairs)
    with pytest.raises(DataError, match=rf"^{path}, line 4, field 'chosen'.*\(identical_responses: 1\)"):
        _dm(path, tiny_tokenizer, unpair=True).setup()
    dm = _dm(path, tiny_tokenizer, unpair=True, on_bad_row="skip")
    dm.setup()
    assert dm.report["splits"]["train"]["bad_by_kind"]["identical_responses"]["examples"][0]["where"].endswith("line 4")
    assert len(dm.datasets["train"]) + len(dm.datasets["val"]) == 2 * 5


# ------------------------------------------------------------------------------------------------ detection
def test_detect_format_unpaired():
    assert detect_format(["prompt", "completion", "label"]) == "unpaired"
    assert detect_format(["label", "extra", "completion", "prompt"]) == "unpaired"
    assert detect_format(["prompt", "chosen", "rejected", "label"]) == "explicit"  # a pair with a stray label
    with pytest.raises(ValueError, match="data.format"):
        detect_format(["prompt", "chosen", "rejected", "completion", "label"])  # both kinds: ambiguous
    with pytest.raises(ValueError, match=r"\{prompt, completion, label\} \(unpaired\)"):
        detect_format(["completion", "label"])


def test_columns_map_onto_prompt_completion_label(tmp_path, tiny_tokenizer):
    theirs = [{"question": r["prompt"], "answer": r["completion"], "thumbs_up": int(r["label"])} for r in _rows(8)]
    path = _write(tmp_path / "theirs.jsonl", theirs)
    dm = _dm(path, tiny_tokenizer, columns={"prompt": "question", "completion": "answer", "label": "thumbs_up"})
    dm.setup()
    assert dm.formats["train"] == "unpaired"
    rows = sorted(list(dm.datasets["train"]) + list(dm.datasets["val"]), key=lambda r: r["record"])
    assert [r["label"] for r in rows] == [bool(t["thumbs_up"]) for t in theirs]
    expected = response_ids(tiny_tokenizer, [t["answer"] for t in theirs])
    assert [r["completion_input_ids"] for r in rows] == expected
    raw = datasets.Dataset.from_list(theirs)
    with pytest.raises(ValueError, match="must be among prompt, chosen, rejected, completion, label"):
        apply_columns(raw, {"desirable": "thumbs_up"}, "x")


# ------------------------------------------------------------------------------------------------ tokenization
def test_unpaired_rows_tokenize_like_pairs(tmp_path, tiny_tokenizer):
    rows = _rows(8)
    dm = _dm(_write(tmp_path / "u.jsonl", rows), tiny_tokenizer)
    dm.setup()
    got = {r["record"]: r for r in list(dm.datasets["train"]) + list(dm.datasets["val"])}
    assert sorted(got) == list(range(8))
    p_ids = prompt_ids(tiny_tokenizer, [r["prompt"] for r in rows])
    c_ids = response_ids(tiny_tokenizer, [r["completion"] for r in rows])
    for i, row in enumerate(rows):
        assert got[i]["index"] == i  # unpaired format: the row id is the record
        assert got[i]["prompt_input_ids"] == p_ids[i] and got[i]["completion_input_ids"] == c_ids[i]
        assert got[i]["completion_input_ids"][-1] == tiny_tokenizer.eos_token_id
        assert got[i]["label"] is row["label"]
        assert got[i]["completion_len"] == got[i]["completion_tokens"] == len(c_ids[i])


def test_unpaired_truncation_follows_the_pair_rules(tmp_path, tiny_tokenizer):
    """A long prompt is cut to max_prompt_length first (keep_end keeps its end), then the completion to what is
    left of max_length; with data.unpair each row is cut on its own (the short row keeps its whole prompt)."""
    prompt = "Review: " + " ".join(WORDS) + " The film was"
    long, short = " " + " ".join(WORDS * 3) + ".", " fine."
    path = _write(tmp_path / "long.jsonl", [{"prompt": prompt, "chosen": long, "rejected": short}] * 4)
    dm = _dm(path, tiny_tokenizer, unpair=True, max_length=64, max_prompt_length=16, val_fraction=0.25)
    dm.setup()
    rows = {r["index"]: r for r in list(dm.datasets["train"]) + list(dm.datasets["val"])}
    (p,) = prompt_ids(tiny_tokenizer, [prompt])
    c_long, c_short = response_ids(tiny_tokenizer, [long, short])
    assert len(p) > 16 and len(p) + len(c_long) > 64 and len(p) + len(c_short) <= 64, "the case needs these"
    desirable, undesirable = rows[0], rows[1]
    assert desirable["prompt_input_ids"] == p[-16:] and desirable["completion_input_ids"] == c_long[: 64 - 16]
    assert (desirable["prompt_input_ids"], desirable["completion_input_ids"]) == truncate_row(
        p, c_long, max_length=64, max_prompt_length=16
    )
    assert undesirable["prompt_input_ids"] == p and undesirable["completion_input_ids"] == c_short
    assert dm.report["splits"]["train"]["truncation_rate"] == {"prompt": 0.5, "completion": 0.5}
    assert dm.report["splits"]["train"]["missing_eos"] == {"completion": 4}


# ------------------------------------------------------------------------------------------------ data.unpair
def test_unpair_splits_each_pair_into_a_desirable_and_an_undesirable_row(tmp_path, tiny_tokenizer, pairs_file):
    raw = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    dm = _dm(str(pairs_file), tiny_tokenizer, unpair=True, max_length=128, max_prompt_length=64)
    dm.setup()
    train, val = list(dm.datasets["train"]), list(dm.datasets["val"])
    assert len(train) + len(val) == 2 * len(raw)
    assert not {r["record"] for r in train} & {r["record"] for r in val}, "a pair's rows stay on one side"
    assert len(val) == 2 * round(0.25 * len(raw))
    rows = {r["index"]: r for r in train + val}
    assert sorted(rows) == list(range(2 * len(raw))), "index: 2·record and 2·record + 1, unique"
    for record, pair in enumerate(raw):
        good, bad = rows[2 * record], rows[2 * record + 1]
        assert good["record"] == bad["record"] == record
        assert good["label"] is True and bad["label"] is False
        (p,) = prompt_ids(tiny_tokenizer, [pair["prompt"]])
        chosen, rejected = response_ids(tiny_tokenizer, [pair["chosen"], pair["rejected"]])
        assert good["prompt_input_ids"] == bad["prompt_input_ids"] == p
        assert good["completion_input_ids"] == chosen and bad["completion_input_ids"] == rejected
    report = dm.report["splits"]["train"]
    assert report["unpaired_from_pairs"] and report["labels"]["desirable_fraction"] == 0.5
    assert dm.report["unit"] == "rows" and dm.unpaired


def test_unpair_identical_after_truncation_is_counted_and_dropped(tmp_path, tiny_tokenizer):
    """Chosen and rejected that differ only after max_length make two rows with one text and opposite labels."""
    common = " " + " ".join(WORDS * 4)
    pairs = [{"prompt": "Q", "chosen": common + " great.", "rejected": common + " awful."}] * 2 + _pairs(6)
    path = _write(tmp_path / "same.jsonl", pairs)
    dm = _dm(path, tiny_tokenizer, unpair=True, max_length=24, max_prompt_length=8)
    dm.setup()
    assert dm.identical["train"] == 4
    assert {r["record"] for r in list(dm.datasets["train"]) + list(dm.datasets["val"])} == set(range(2, 8))
    kept = _dm(path, tiny_tokenizer, unpair=True, max_length=24, max_prompt_length=8, drop_identical=False)
    kept.setup()
    assert len(kept.datasets["train"]) + len(kept.datasets["val"]) == 16


# ------------------------------------------------------------------------------------------------ collator
def _features(lengths: list[tuple[int, int]], labels: list[bool]) -> list[dict]:
    """Rows whose ids tell prompt (100 + row) and completion (200 + row) tokens apart."""
    return [
        {
            "prompt_input_ids": [100 + i] * p,
            "completion_input_ids": [200 + i] * c,
            "label": label,
            "index": 10 * i + 7,
        }
        for i, ((p, c), label) in enumerate(zip(lengths, labels, strict=True))
    ]


def test_unpaired_collator_matched_then_mismatched_rows():
    features = _features([(3, 2), (1, 4), (2, 1)], [True, False, True])
    batch = UnpairedCollator(pad_token_id=0)(features)
    _check_contract(batch, features)
    # spelled out: rows 0..2 prompt_i + completion_i, rows 3..5 prompt_i + completion_{(i+1) mod 3}; width 7 is
    # a mismatched row's (prompt 0's 3 tokens + completion 1's 4), longer than any matched row
    x = -100
    assert batch["input_ids"].tolist() == [
        [100, 100, 100, 200, 200, 0, 0],
        [101, 201, 201, 201, 201, 0, 0],
        [102, 102, 202, 0, 0, 0, 0],
        [100, 100, 100, 201, 201, 201, 201],
        [101, 202, 0, 0, 0, 0, 0],
        [102, 102, 200, 200, 0, 0, 0],
    ]
    assert batch["labels"].tolist() == [
        [x, x, x, 200, 200, x, x],
        [x, 201, 201, 201, 201, x, x],
        [x, x, 202, x, x, x, x],
        [x, x, x, 201, 201, 201, 201],
        [x, 202, x, x, x, x, x],
        [x, x, 200, 200, x, x, x],
    ]
    assert batch["attention_mask"].sum(1).tolist() == [5, 5, 3, 7, 2, 4]
    assert batch["desirable"].tolist() == [True, False, True] and batch["index"].tolist() == [7, 17, 27]


def test_unpaired_collator_batch_of_one_mismatches_with_itself():
    """B = 1: there is no other completion, (i + 1) mod 1 = i, so the mismatched row is the matched row."""
    features = _features([(2, 3)], [False])
    batch = UnpairedCollator(pad_token_id=0)(features)
    _check_contract(batch, features)
    assert batch["input_ids"].shape == (2, 5)
    assert torch.equal(batch["input_ids"][0], batch["input_ids"][1])
    assert torch.equal(batch["labels"][0], batch["labels"][1])
    assert batch["desirable"].tolist() == [False]


def test_unpaired_collator_cuts_mismatched_rows_at_max_length():
    """Every row of the data fits max_length 8, but prompt 0 (6) + completion 1 (7) does not: it is cut as rows are
    (prompt to max_prompt_length 4 first, keep_end, then the completion to the 4 tokens left)."""
    features = [
        {"prompt_input_ids": [1, 2, 3, 4, 5, 6], "completion_input_ids": [7, 8], "label": True, "index": 0},
        {"prompt_input_ids": [9], "completion_input_ids": [10, 11, 12, 13, 14, 15, 16], "label": False, "index": 1},
    ]
    batch = UnpairedCollator(0, max_length=8, max_prompt_length=4)(features)
    assert batch["input_ids"].shape == (4, 8)
    assert batch["input_ids"][2].tolist() == [3, 4, 5, 6, 10, 11, 12, 13]
    assert batch["labels"][2].tolist() == [IGNORE_INDEX] * 4 + [10, 11, 12, 13]
    assert batch["input_ids"][3].tolist() == [9, 7, 8, 0, 0, 0, 0, 0]  # fits: untouched
    uncut = UnpairedCollator(0)(features)
    assert uncut["input_ids"].shape == (4, 13)


# ------------------------------------------------------------------------------------------------ data module
def test_datamodule_end_to_end_batches_follow_the_contract(tmp_path, tiny_tokenizer):
    path = _write(tmp_path / "u.jsonl", _rows(24))
    dm = _dm(path, tiny_tokenizer, batch_size=4, eval_batch_size=3)
    dm.setup()
    train = {r["index"]: r for r in dm.datasets["train"]}
    assert len(train) == 18 and len(dm.datasets["val"]) == 6
    assert isinstance(dm.collator(), UnpairedCollator)
    seen = []
    for batch in dm.train_dataloader():
        features = [train[i] for i in batch["index"].tolist()]
        _check_contract(batch, features)
        seen += batch["index"].tolist()
    assert sorted(seen) == sorted(train), "every training row once per epoch"
    val = {r["index"]: r for r in dm.datasets["val"]}
    batches = list(dm.val_dataloader())
    assert [len(b["index"]) for b in batches] == [3, 3]
    for batch in batches:
        _check_contract(batch, [val[i] for i in batch["index"].tolist()])
    # length grouping reads prompt + completion
    lengths = dm.pair_lengths("train").tolist()
    rows = list(dm.datasets["train"])
    assert lengths == [len(r["prompt_input_ids"]) + len(r["completion_input_ids"]) for r in rows]
    assert dm.report["padding"]["grouped"] <= dm.report["padding"]["random"]


def test_label_noise_flips_unpaired_labels_by_record(tmp_path, tiny_tokenizer, pairs_file):
    """label_noise 0.25 flips the label of round(0.25 · records) training records; with unpair both rows of a
    flipped pair (the same noise as swapping chosen and rejected); validation is never flipped."""
    clean = _dm(str(pairs_file), tiny_tokenizer, unpair=True, max_length=128, max_prompt_length=64)
    noisy = _dm(str(pairs_file), tiny_tokenizer, unpair=True, max_length=128, max_prompt_length=64, label_noise=0.25)
    clean.setup()
    noisy.setup()
    flipped: dict[int, list[int]] = {}
    for a, b in zip(clean.datasets["train"], noisy.datasets["train"], strict=True):
        assert a["index"] == b["index"] and a["completion_input_ids"] == b["completion_input_ids"]
        if a["label"] != b["label"]:
            flipped.setdefault(a["record"], []).append(a["index"])
    records = len({r["record"] for r in clean.datasets["train"]})
    assert len(flipped) == round(0.25 * records)
    assert all(sorted(v) == [2 * k, 2 * k + 1] for k, v in flipped.items()), "both rows of each flipped pair"
    assert clean.datasets["val"]["label"] == noisy.datasets["val"]["label"]


def test_audit_reports_unpaired_rows_and_checks_completion_truncation(tmp_path, tiny_tokenizer):
    rows = _rows(12)
    rows[0]["completion"] = " " + " ".join(WORDS * 8)  # cut at max_length
    path = _write(tmp_path / "u.jsonl", rows)
    dm = _dm(path, tiny_tokenizer, max_truncation_rate=0.05)
    with pytest.raises(DataError, match=r"train completion truncation rate 0\.083 > data\.max_truncation_rate"):
        dm.setup()
    dm = _dm(path, tiny_tokenizer)
    dm.setup()
    train = dm.report["splits"]["train"]
    assert train["rows"] == 12 and train["labels"] == {"desirable": 6, "undesirable": 6, "desirable_fraction": 0.5}
    assert set(train["tokens"]) == {"prompt", "completion", "desirable", "undesirable"}
    assert train["missing_eos"] == {"completion": 1}
    assert train["length_gap"]["desirable_mean"] > train["length_gap"]["undesirable_mean"], "row 0 is desirable"
    assert dm.report["pairs"]["train"] + dm.report["pairs"]["val"] == 12


def test_train_and_val_must_both_be_unpaired(tmp_path, tiny_tokenizer):
    unpaired = _write(tmp_path / "u.jsonl", _rows(8))
    paired = _write(tmp_path / "p.jsonl", _pairs(4))
    with pytest.raises(DataError, match=r"unpaired rows \(format unpaired\).*pairs \(format explicit\).*data\.unpair"):
        _dm(unpaired, tiny_tokenizer, val_files=paired).setup()
    dm = _dm(unpaired, tiny_tokenizer, val_files=paired, unpair=True)
    dm.setup()
    assert sorted(dm.datasets["val"]["index"]) == list(range(8)) and len(dm.datasets["train"]) == 8


def test_unpaired_batch_size_one_warns(tmp_path, tiny_tokenizer):
    with pytest.warns(UserWarning, match="data.batch_size 1 with unpaired rows"):
        _dm(_write(tmp_path / "u.jsonl", _rows(8)), tiny_tokenizer, batch_size=1).setup()
