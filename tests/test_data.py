"""Preference data: formats, bad rows, tokenization boundaries, truncation, collation, label noise."""

import gzip
import json

import pytest

from dpo_lightning.data.formats import BadRow, parse_hh
from dpo_lightning.data.tokenize import PairCollator, truncate_pair
from dpo_lightning.errors import DataError
from dpo_lightning.logps import IGNORE_INDEX

from helpers import HH_TEST, make_datamodule, write_jsonl

GOOD = {"prompt": "Q: hi?", "chosen": " yes", "rejected": " no"}


def _dm(path, tokenizer, **kwargs):
    return make_datamodule(path, tokenizer, **{"val_fraction": 0.5, **kwargs})


def test_hh_split_multi_turn():
    """The prompt is everything up to and including the LAST '\\n\\nAssistant:'; responses are the rest."""
    row = {
        "chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Joke?\n\nAssistant: Why did the chicken...",
        "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Joke?\n\nAssistant: No.",
    }
    prompt, chosen, rejected = parse_hh(row)
    assert prompt == "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Joke?\n\nAssistant:"
    assert chosen == " Why did the chicken..." and rejected == " No."


@pytest.mark.parametrize(
    "row,kind,field",
    [
        ({"chosen": " a", "rejected": " b"}, "missing_field", "prompt"),
        ({"prompt": None, "chosen": " a", "rejected": " b"}, "missing_field", "prompt"),
        ({"prompt": "p", "chosen": 3, "rejected": " b"}, "not_a_string", "chosen"),
        ({"prompt": "p", "chosen": " ", "rejected": " b"}, "empty_response", "chosen"),
        ({"prompt": "p", "chosen": " same", "rejected": " same"}, "identical_responses", "chosen"),
    ],
)
def test_explicit_bad_rows(tmp_path, tiny_tokenizer, row, kind, field):
    """Each bad record stops setup with file, line (1-based, as an editor counts) and field named; with skip it is
    counted."""
    rows = [GOOD, dict(GOOD, chosen=" ok"), row, dict(GOOD, chosen=" sure")]
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError) as err:
        _dm(path, tiny_tokenizer).setup()
    message = str(err.value)
    assert f"{path}, line 3, field {field!r}" in message and f"{kind}: 1" in message
    dm = _dm(path, tiny_tokenizer, on_bad_row="skip")
    dm.setup()
    assert dm.skipped["train"] == {kind: 1}
    assert len(dm.datasets["train"]) + len(dm.datasets["val"]) == 3


@pytest.mark.parametrize(
    "row,kind",
    [
        ({"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: hi\n\nAssistant: x"}, "no_assistant_turn"),
        (
            {"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"},
            "hh_prompt_mismatch",
        ),
        (
            {"chosen": "\n\nHuman: a\n\nAssistant:", "rejected": "\n\nHuman: a\n\nAssistant: y"},
            "empty_response",
        ),
    ],
)
def test_hh_bad_rows(row, kind):
    with pytest.raises(BadRow) as err:
        parse_hh(row)
    assert err.value.kind == kind


def test_real_hh_file_bad_rows_are_found_and_counted(tiny_tokenizer):
    """The shared HH harmless-base test split has 8 malformed pairs (4 with an empty final assistant turn,
    4 whose transcripts diverge before the last assistant turn); counted, not silently dropped. (Pairs that
    become identical after truncation are kept here, so that every good record is accounted for.)"""
    dm = make_datamodule(HH_TEST, tiny_tokenizer, format="hh", max_length=128, max_prompt_length=64,
                         val_fraction=0.05, on_bad_row="skip", max_rows=None, drop_identical=False)  # fmt: skip
    dm.setup()
    assert dm.skipped["train"] == {"empty_response": 4, "hh_prompt_mismatch": 4}
    with gzip.open(HH_TEST, "rt") as f:
        total = sum(1 for _ in f)
    assert len(dm.datasets["train"]) + len(dm.datasets["val"]) == total - 8


def test_missing_file_and_empty_file(tmp_path, tiny_tokenizer):
    with pytest.raises(DataError, match="does not exist"):
        _dm(tmp_path / "nope.jsonl", tiny_tokenizer).setup()
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty.jsonl"):
        _dm(tmp_path / "empty.jsonl", tiny_tokenizer).setup()


def test_tokenized_boundary_eos_and_labels(tmp_path, tiny_tokenizer):
    """prompt ids + response ids decode back to prompt + response + EOS, EOS appears once at the end of each
    response, and labels cover exactly the response tokens (the prompt and padding are IGNORE_INDEX)."""
    rows = [
        {"prompt": f"Review {i}: it was", "chosen": " great fun.", "rejected": " very dull indeed."} for i in range(6)
    ]
    dm = _dm(write_jsonl(tmp_path / "p.jsonl", rows), tiny_tokenizer)
    dm.setup()
    eos = tiny_tokenizer.eos_token_id
    for row in dm.datasets["train"]:
        prompt = tiny_tokenizer.decode(row["prompt_input_ids"])
        assert prompt.startswith("Review ") and prompt.endswith(": it was")
        for key, text in (("chosen_input_ids", " great fun."), ("rejected_input_ids", " very dull indeed.")):
            ids = row[key]
            assert ids[-1] == eos and ids.count(eos) == 1
            assert tiny_tokenizer.decode(row["prompt_input_ids"] + ids[:-1]) == prompt + text
    batch = PairCollator(tiny_tokenizer.pad_token_id)([dict(r) for r in dm.datasets["train"]])
    n = len(dm.datasets["train"])
    assert batch["input_ids"].shape[0] == 2 * n
    for i, row in enumerate(dm.datasets["train"]):
        p = len(row["prompt_input_ids"])
        for j, key in ((i, "chosen_input_ids"), (n + i, "rejected_input_ids")):
            r = len(row[key])
            assert (batch["labels"][j, :p] == IGNORE_INDEX).all()
            assert batch["labels"][j, p : p + r].tolist() == row[key]
            assert (batch["labels"][j, p + r :] == IGNORE_INDEX).all()
            assert batch["attention_mask"][j].sum().item() == p + r


def test_truncation_modes():
    """max_length 8, max_prompt_length 4, prompt 6 tokens, responses 5 and 3 tokens (6 + 5 > 8):
    keep_end keeps prompt[-4:], keep_start prompt[:4]; then 4 + 5 > 8 so both responses are cut to 8 − 4 = 4.
    A prompt that starts with the BOS (bos_token_id 0 here) keeps it under keep_end: [0] + prompt[-3:]."""
    prompt, chosen, rejected = list(range(6)), [10, 11, 12, 13, 14], [20, 21, 22]
    p, c, r = truncate_pair(prompt, chosen, rejected, max_length=8, max_prompt_length=4, truncation_mode="keep_end")
    assert (p, c, r) == ([2, 3, 4, 5], [10, 11, 12, 13], [20, 21, 22])
    p, _, _ = truncate_pair(prompt, chosen, rejected, max_length=8, max_prompt_length=4, truncation_mode="keep_start")
    assert p == [0, 1, 2, 3]
    assert truncate_pair([1, 2], [3], [4], max_length=8, max_prompt_length=1) == ([1, 2], [3], [4])
    p, c, _ = truncate_pair(prompt, chosen, rejected, max_length=8, max_prompt_length=4, bos_token_id=0)
    assert (p, c) == ([0, 3, 4, 5], [10, 11, 12, 13])
    p, _, _ = truncate_pair(prompt, chosen, rejected, max_length=8, max_prompt_length=4, bos_token_id=99)
    assert p == [2, 3, 4, 5]  # no BOS at the start: keep_end as before


def test_label_noise_flips_a_seeded_fraction(tmp_path, tiny_tokenizer, pairs_file):
    """label_noise 0.25 swaps chosen and rejected in round(0.25 · n) training pairs and no validation pair."""
    clean = _dm(pairs_file, tiny_tokenizer)
    clean.setup()
    noisy = _dm(pairs_file, tiny_tokenizer, label_noise=0.25)
    noisy.setup()
    flipped = sum(
        a["chosen_input_ids"] != b["chosen_input_ids"]
        for a, b in zip(clean.datasets["train"], noisy.datasets["train"], strict=True)
    )
    assert flipped == round(0.25 * len(clean.datasets["train"]))
    assert clean.datasets["val"]["chosen_input_ids"] == noisy.datasets["val"]["chosen_input_ids"]


@pytest.mark.parametrize("fmt", ["explicit", "unpaired"])
def test_val_fraction_zero_means_no_validation_split(tmp_path, tiny_tokenizer, pairs_file, fmt):
    """data.val_fraction: 0 keeps every pair for training and gives Lightning no validation loader (before the fix:
    a datasets ValueError from train_test_split(test_size=0.0)); 1 or more is a config error."""
    from dpo_lightning.errors import ConfigError

    rows = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    if fmt == "unpaired":
        rows = [{"prompt": r["prompt"], "completion": r["chosen"], "label": i % 2 == 0} for i, r in enumerate(rows)]
    dm = _dm(write_jsonl(tmp_path / "d.jsonl", rows), tiny_tokenizer, format=fmt, val_fraction=0)
    dm.setup()
    assert len(dm.datasets["train"]) == len(rows) and len(dm.datasets["val"]) == 0
    assert dm.val_dataloader() == [] and dm.report["pairs"]["val"] == 0
    with pytest.raises(ConfigError, match=r"data.val_fraction must be in \[0, 1\)"):
        _dm(pairs_file, tiny_tokenizer, val_fraction=1.0)
