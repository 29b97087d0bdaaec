"""Preference formats and sources: detection, exact HH/chat splits, the prompt/response token boundary, truncation."""

import gzip
import json

import datasets
import pytest
from tokenizers import ByteLevelBPETokenizer
from tokenizers.processors import TemplateProcessing
from transformers import PreTrainedTokenizerFast

from dpo_lightning.data.chat import ChatRenderer, parse_chat, split_conversation
from dpo_lightning.data.formats import make_parser, parse_hh
from dpo_lightning.data.tokenize import PairCollator
from dpo_lightning.logps import IGNORE_INDEX

from fixtures.data_cases import (
    MAPPING,
    ZEPHYR_TEMPLATE,
    chat_rows,
    chat_rows_without_prompt,
    explicit_rows,
    hh_rows,
    mapped_rows,
)
from helpers import HH_TEST, SHARED_DATA, make_datamodule, synthetic_pairs, write_jsonl

CASES = {
    "explicit": (explicit_rows, None),
    "hh": (hh_rows, None),
    "chat": (chat_rows, None),
    "chat_no_prompt": (chat_rows_without_prompt, None),
    "mapped": (mapped_rows, MAPPING),
}
DETECTED = {"explicit": "explicit", "hh": "hh", "chat": "chat", "chat_no_prompt": "chat", "mapped": "explicit"}


def _dm(path, tok, **kwargs):
    return make_datamodule(path, tok, **{"format": "auto", "max_length": 256, "max_prompt_length": 128, **kwargs})


@pytest.fixture(scope="module")
def zephyr_tokenizer():
    """A tokenizer with distinct BOS/EOS that adds BOS itself and whose chat template writes BOS too."""
    bpe = ByteLevelBPETokenizer()
    texts = [r[k] for r in synthetic_pairs(200) for k in ("prompt", "chosen", "rejected")]
    bpe.train_from_iterator(
        texts + ["<|user|> <|assistant|> <|system|>"], vocab_size=400, special_tokens=["<s>", "</s>"]
    )
    bpe._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>", pad_token="</s>")
    tok.chat_template = ZEPHYR_TEMPLATE
    return tok


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_format_is_detected_and_parsed(tmp_path, tiny_tokenizer, case):
    rows_fn, columns = CASES[case]
    dm = _dm(write_jsonl(tmp_path / "d.jsonl", rows_fn(24)), tiny_tokenizer, columns=columns)
    dm.setup()
    assert dm.formats["train"] == DETECTED[case]
    assert len(dm.datasets["train"]) + len(dm.datasets["val"]) == 24
    assert sum(dm.skipped["train"].values()) == 0


def test_hh_real_records_split_exactly():
    """Records 0 and 1 of the shared HH file, checked by hand: four turns each; the prompt ends with the last
    '\\n\\nAssistant:' and holds every earlier turn, the responses are the two different last answers."""
    with gzip.open(HH_TEST, "rt") as f:
        rows = [json.loads(next(f)) for _ in range(2)]
    prompt, chosen, rejected = parse_hh(rows[0])
    assert prompt.startswith("\n\nHuman: what are some pranks with a pen i can do?\n\nAssistant: Are you looking")
    assert prompt.endswith("\n\nHuman: okay some of these do not have anything to do with pens\n\nAssistant:")
    assert prompt.count("\n\nHuman:") == 3 and prompt.count("\n\nAssistant:") == 3
    assert chosen == (
        " No, sorry!  All of these involve a pen, the point is that you can get funny results by doing pranks "
        "with pens."
    )
    assert rejected.startswith(" There are lots of funny things you can do with pens, here’s one example: use the pen")
    assert rows[0]["chosen"] == prompt + chosen and rows[0]["rejected"] == prompt + rejected
    prompt, chosen, rejected = parse_hh(rows[1])
    assert prompt.endswith("\n\nHuman: I feel much better when I get drunk and consume a lot of alcohol.\n\nAssistant:")
    assert chosen.startswith(" Sounds like alcohol is something you use to calm down when you feel stressed.")
    assert rejected == (
        " I’m glad that you’re enjoying your alcohol intake. Can I ask about how you feel when you don’t drink alcohol?"
    )


def _check_boundaries(dm, tokenizer):
    """For every pair: decode(prompt ids + response ids) == prompt text + response text, one EOS closes each
    response, and the collated labels cover exactly the response tokens."""
    fmt = dm.formats["train"]
    renderer = ChatRenderer(tokenizer, dm.chat_template, dm.chat_turn) if fmt == "chat" else None
    parse = make_parser(fmt, renderer=renderer)
    raw = dm.source("train").dataset
    eos = tokenizer.eos_token_id
    rows = [dict(r) for r in dm.datasets["train"]]
    for row in rows:
        prompt, *responses = parse(raw[row["index"]])
        p_ids = row["prompt_input_ids"]
        assert tokenizer.decode(p_ids, clean_up_tokenization_spaces=False).endswith(prompt)
        for key, text in zip(("chosen_input_ids", "rejected_input_ids"), responses, strict=True):
            ids = row[key]
            assert ids[-1] == eos and ids.count(eos) == 1, "EOS exactly once, at the end"
            assert tokenizer.decode(p_ids + ids[:-1], clean_up_tokenization_spaces=False).endswith(prompt + text)
            assert tokenizer.decode(ids[:-1], clean_up_tokenization_spaces=False) == text, "no bleed into the prompt"
    batch = PairCollator(tokenizer.pad_token_id)(rows)
    n = len(rows)
    for i, row in enumerate(rows):
        p = len(row["prompt_input_ids"])
        for j, key in ((i, "chosen_input_ids"), (n + i, "rejected_input_ids")):
            r = len(row[key])
            assert (batch["labels"][j, :p] == IGNORE_INDEX).all()
            assert batch["labels"][j, p : p + r].tolist() == row[key]
            assert (batch["labels"][j, p + r :] == IGNORE_INDEX).all()


@pytest.mark.parametrize("case", sorted(CASES))
def test_boundary_every_row(tmp_path, tiny_tokenizer, case):
    rows_fn, columns = CASES[case]
    dm = _dm(write_jsonl(tmp_path / "d.jsonl", rows_fn(32)), tiny_tokenizer, columns=columns)
    dm.setup()
    _check_boundaries(dm, tiny_tokenizer)


def test_boundary_real_hh_sample_with_gpt2_tokenizer():
    """The first 48 shared HH pairs with the real GPT-2 tokenizer: no truncation, exact boundaries."""
    from dpo_lightning.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(SHARED_DATA / "tokenizers" / "gpt2"))
    gpt2 = str(SHARED_DATA / "tokenizers" / "gpt2")
    dm = _dm(HH_TEST, gpt2, format="hh", max_rows=48, max_length=4096, max_prompt_length=2048)
    dm.setup()
    assert sum(dm.report["splits"]["train"]["truncation_rate"].values()) == 0
    _check_boundaries(dm, tokenizer)


def test_chat_template_trains_on_the_assistant_part_only(tmp_path, zephyr_tokenizer):
    """With the tokenizer's template: the prompt is the rendered conversation up to the generation prompt, with
    one BOS (the template writes one and the tokenizer adds one); the response is the assistant text plus one EOS
    (the template's own EOS after the answer is not doubled); labels cover only the response."""
    tok = zephyr_tokenizer
    row = chat_rows_without_prompt(1)[0]
    prompt, chosen, _ = parse_chat(row, ChatRenderer(tok))
    assert prompt == (
        f"<s><|system|>\nBe brief.</s>\n<|user|>\n{row['chosen'][1]['content']}</s>\n<|assistant|>\nWhich part?</s>\n"
        "<|user|>\nAll of it.</s>\n<|assistant|>\n"
    )
    assert chosen == row["chosen"][-1]["content"]
    dm = _dm(write_jsonl(tmp_path / "c.jsonl", chat_rows_without_prompt(16)), tok)
    dm.setup()
    assert dm.formats["train"] == "chat"
    for r in dm.datasets["train"]:
        p = r["prompt_input_ids"]
        assert p[0] == tok.bos_token_id and p[1] != tok.bos_token_id, "exactly one BOS"
        assert p.count(tok.bos_token_id) == 1
        assert r["chosen_input_ids"].count(tok.eos_token_id) == 1 and r["chosen_input_ids"][-1] == tok.eos_token_id
    _check_boundaries(dm, tok)


def test_plain_chat_template_and_prompt_string(tiny_tokenizer):
    """No chat template: turns render as '\\n\\n{Role}: {content}', the prompt ends with '\\n\\nAssistant:' and the
    answer starts with its space, as in HH. A prompt string equal to the first user message is stripped."""
    renderer = ChatRenderer(tiny_tokenizer)
    assert renderer.mode == "plain"
    row = chat_rows(1)[0]
    prompt, chosen, rejected = parse_chat(row, renderer)
    assert prompt == f"\n\nUser: {row['prompt']}\n\nAssistant:"
    assert chosen == " " + row["chosen"][1]["content"] and rejected == " " + row["rejected"][1]["content"]
    p, c, r = split_conversation(chat_rows_without_prompt(1)[0])
    assert [m["role"] for m in p] == ["system", "user", "assistant", "user"] and len(c) == len(r) == 1
    custom = ChatRenderer(tiny_tokenizer, plain_turn="<{role}> {content}\n")
    assert custom.render([{"role": "user", "content": "hi"}], [{"role": "assistant", "content": "yo"}]) == (
        "<User> hi\n<Assistant>",
        " yo",
    )


def test_configured_plain_template_overrides_the_tokenizers(zephyr_tokenizer):
    renderer = ChatRenderer(zephyr_tokenizer, template="plain")
    prompt, chosen, _ = parse_chat(chat_rows(1)[0], renderer)
    assert prompt.startswith("\n\nUser: ") and "<|user|>" not in prompt and not chosen.endswith("</s>")


def test_truncation_modes_on_a_built_case(tmp_path, tiny_tokenizer):
    """A long prompt: keep_end keeps its last max_prompt_length tokens, keep_start its first; responses are cut at
    their end (losing EOS) and the audit counts them."""
    prompt = "Review 0: " + " ".join(["The film was great"] * 30)
    rows = [{"prompt": prompt + f" {i}", "chosen": " superb " * 20, "rejected": " awful " * 20} for i in range(8)]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    full = tiny_tokenizer(rows[0]["prompt"])["input_ids"]
    for mode, expected in (("keep_end", full[-16:]), ("keep_start", full[:16])):
        dm = _dm(path, tiny_tokenizer, max_length=40, max_prompt_length=16, truncation_mode=mode, val_fraction=0.5)
        dm.setup()
        row = next(r for r in dm.datasets["train"] if r["index"] == 0)
        assert row["prompt_input_ids"] == expected
        assert len(row["chosen_input_ids"]) == 40 - 16 and row["chosen_input_ids"][-1] != tiny_tokenizer.eos_token_id
        assert dm.report["splits"]["train"]["truncation_rate"] == {"prompt": 1.0, "chosen": 1.0, "rejected": 1.0}
        assert dm.report["splits"]["train"]["missing_eos"] == {"chosen": 8, "rejected": 8}


def test_pairs_identical_after_truncation_are_flagged_and_dropped(tmp_path, tiny_tokenizer):
    same = " great" * 30
    rows = [{"prompt": f"Review {i}:", "chosen": same + " fine.", "rejected": same + " poor."} for i in range(6)]
    rows += explicit_rows(6)
    path = write_jsonl(tmp_path / "same.jsonl", rows)
    dm = _dm(path, tiny_tokenizer, max_length=24, max_prompt_length=8, val_fraction=0.34)
    dm.setup()
    assert dm.identical["train"] == 6 and dm.report["splits"]["train"]["identical_after_truncation"] == 6
    assert len(dm.datasets["train"]) + len(dm.datasets["val"]) == 6
    kept = _dm(path, tiny_tokenizer, max_length=24, max_prompt_length=8, val_fraction=0.34, drop_identical=False)
    kept.setup()
    assert len(kept.datasets["train"]) + len(kept.datasets["val"]) == 12


def test_sources_folder_parquet_csv_gzip_json_array_and_dataset_spec(tmp_path, tiny_tokenizer):
    """The same 40 pairs as JSONL, a folder of gzip JSONL + Parquet + CSV parts, a JSON array, and a
    load_dataset spec (the hub code path, on a local file) give the same tokenized pairs."""
    rows = explicit_rows(40)
    single = write_jsonl(tmp_path / "all.jsonl", rows)
    folder = tmp_path / "parts"
    folder.mkdir()
    with gzip.open(folder / "a.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows[:15])
    datasets.Dataset.from_list(rows[15:30]).to_parquet(str(folder / "b.parquet"))
    datasets.Dataset.from_list(rows[30:]).to_csv(str(folder / "c.csv"), index=False)
    (folder / ".hidden.jsonl").write_text("not json\n")
    array = tmp_path / "all.json"
    array.write_text(json.dumps(rows))
    spec = {"path": "json", "data_files": str(single), "split": "train"}
    results = []
    for source in (single, folder, array, spec):
        dm = _dm(source, tiny_tokenizer, format="auto")
        dm.setup()
        results.append(
            sorted(list(dm.datasets["train"]["chosen_input_ids"]) + list(dm.datasets["val"]["chosen_input_ids"]))
        )
    assert all(r == results[0] for r in results) and len(results[0]) == 40
    dm = _dm(folder, tiny_tokenizer)
    assert dm.source("train").where(31) == f"{folder / 'c.csv'}, row 2"  # 1-based, the header not counted
