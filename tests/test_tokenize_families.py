"""Tokenization that is right for every tokenizer family: response ids are the joint tokenization's, BOS once, an
empty prompt scores every response token, keep_end keeps the BOS, merges across the boundary go to the response.

Families (helpers.family_tokenizer, nothing from the hub): ``gpt2`` (byte-level, no BOS) trained here and
``gpt2-files`` (the real GPT-2 files), ``llama3`` (byte-level, adds BOS), ``qwen2`` (byte-level, no BOS token at
all) and ``llama2`` (SentencePiece-style: "▁" dummy prefix, byte fallback, adds BOS); chat rows with a
Llama-3-style and a ChatML template on each.
"""

import json

import pytest

from dpo_lightning.data.chat import ChatRenderer
from dpo_lightning.data.formats import parse_explicit, parse_hh
from dpo_lightning.data.tokenize import (
    PairCollator,
    UnpairedCollator,
    joint_ids,
    prompt_ids,
    response_ids,
    tokenize_rows,
    tokenize_unpaired_rows,
)
from dpo_lightning.logps import response_lengths

from helpers import HH_TEST, TOKENIZER_FAMILIES, make_datamodule, synthetic_pairs, write_jsonl

FAMILIES = (*TOKENIZER_FAMILIES, "gpt2-files")
BOS_ADDING = {"llama3", "llama2"}  # their tokenizers write BOS before every text
# (prompt, chosen, rejected) with boundaries that trip up tokenizing the response on its own
PAIRS = [
    ("\n\nHuman: Can you help me?\n\nAssistant:", " Sure, I can help.", " No."),
    ("Question: what is two plus two?\n", "Sure: four", "Five"),  # "\n" + "Sure": no "▁" before Sure in context
    ("Say something nice: ", "Hello there", "Go away"),  # a prompt ending in a space
    ("I liked the mo", "vie a lot.", "vie."),  # a word split across the boundary
    ("日本語の", "テキストです", "文です"),  # multi-byte text across the boundary (byte fallback in llama2)
    ("", "An answer with no prompt.", "Another answer."),  # an empty prompt
]
LIMITS = {"max_length": 512, "max_prompt_length": 256, "truncation_mode": "keep_end"}


def _joint(tok, prompt: str, response: str) -> list[int]:
    """The tokenization of ``prompt + response`` as the model sees it: the tokenizer's own special tokens with BOS
    once (a template may write one too), one EOS at the end, and for an empty prompt with a tokenizer that writes no
    BOS a leading BOS (EOS where there is none) so the first response token is predicted."""
    ids = tok(prompt + response)["input_ids"]
    bos, eos = tok.bos_token_id, tok.eos_token_id
    if bos is not None and ids[:2] == [bos, bos]:
        ids = ids[1:]
    while ids[-1] == eos:
        ids = ids[:-1]
    if not prompt and (bos is None or ids[0] != bos):
        ids = [bos if bos is not None else eos, *ids]
    return [*ids, eos]


def _tokenize(tok, parse, records: list[dict], **limits) -> dict[str, list]:
    columns = {k: [r[k] for r in records] for k in records[0]}
    return tokenize_rows(columns, list(range(len(records))), parse=parse, tokenizer=tok, **{**LIMITS, **limits})


@pytest.mark.parametrize("family", FAMILIES)
def test_response_ids_are_those_of_the_joint_tokenization(family_tokenizers, family):
    tok = family_tokenizers(family, None)
    records = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS]
    out = _tokenize(tok, parse_explicit, records)
    for i, (prompt, chosen, rejected) in enumerate(PAIRS):
        p = out["prompt_input_ids"][i]
        assert p + out["chosen_input_ids"][i] == _joint(tok, prompt, chosen), (family, prompt, chosen)
        assert p + out["rejected_input_ids"][i] == _joint(tok, prompt, rejected), (family, prompt, rejected)
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id  # EOS-as-BOS: Qwen
        if family in BOS_ADDING or not prompt:
            assert p[0] == start
        assert p.count(start) == (1 if family in BOS_ADDING or not prompt else 0), "BOS exactly once"
    if family == "llama2":  # the bug this guards: "Sure" on its own gets the dummy prefix it never has in context
        assert response_ids(tok, ["Sure: four"])[0] != out["chosen_input_ids"][1]


@pytest.mark.parametrize("template", ["llama3", "chatml"])
@pytest.mark.parametrize("family", FAMILIES)
def test_chat_rows_are_the_joint_tokenization_of_the_rendered_chat(family_tokenizers, family, template):
    """The Llama-3-style template writes {{ bos_token }} itself: with a BOS-adding tokenizer that would be two."""
    tok = family_tokenizers(family, template)
    history = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Can you help me?"},
        {"role": "assistant", "content": "Yes.\n"},
        {"role": "user", "content": "Name a colour."},
    ]
    answers = (("Sure: blue", "No"), ("\nRed", " Green "))
    reply = [[{"role": "assistant", "content": text} for text in pair] for pair in answers]
    rows = [{"chosen": [*history, chosen], "rejected": [*history, rejected]} for chosen, rejected in reply]
    renderer = ChatRenderer(tok)
    out = _tokenize(tok, renderer.parse, rows)
    for i, row in enumerate(rows):
        for key in ("chosen", "rejected"):
            prompt_text, response_text = renderer.render(history, row[key][-1:])
            full = tok.apply_chat_template(row[key], tokenize=False)
            assert full.startswith(prompt_text + response_text)  # the rendered chat, up to its final EOS text
            ids = out["prompt_input_ids"][i] + out[f"{key}_input_ids"][i]
            assert ids == _joint(tok, prompt_text, response_text), (family, template, key)
        p = out["prompt_input_ids"][i]
        if tok.bos_token_id is not None and (family in BOS_ADDING or template == "llama3"):
            assert p[0] == tok.bos_token_id and p.count(tok.bos_token_id) == 1, "BOS exactly once"


@pytest.mark.parametrize("family", FAMILIES)
def test_empty_prompt_scores_every_response_token(family_tokenizers, family):
    """Labels are shifted by one (logits at t predict token t+1): the first response token is scored only when a
    token stands before it. Before the fix, GPT-2 and Qwen tokenizers (no BOS written) lost it."""
    tok = family_tokenizers(family, None)
    out = _tokenize(tok, parse_explicit, [{"prompt": "", "chosen": "Good answer.", "rejected": "Bad one."}])
    batch = PairCollator(tok.pad_token_id)([{k: v[0] for k, v in out.items()}])
    assert response_lengths(batch["labels"]).tolist() == [
        len(out["chosen_input_ids"][0]),
        len(out["rejected_input_ids"][0]),
    ]
    rows = {"prompt": ["", ""], "completion": ["Good answer.", "Bad one."], "label": [True, False]}
    unpaired = tokenize_unpaired_rows(
        rows, [0, 1], parse=lambda r: (r["prompt"], r["completion"], r["label"]), tokenizer=tok, **LIMITS
    )
    features = [{k: v[j] for k, v in unpaired.items()} for j in range(2)]
    batch = UnpairedCollator(tok.pad_token_id)(features)
    lengths = [len(f["completion_input_ids"]) for f in features]
    assert response_lengths(batch["labels"][:2]).tolist() == lengths


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_end_truncation_keeps_the_bos(family_tokenizers, family):
    tok = family_tokenizers(family, None)
    prompt = "\n\nHuman: " + "tell me about the film and the actors in it " * 4 + "\n\nAssistant:"
    ((full, _, _),) = joint_ids(tok, [prompt], [[" It was fine."]])
    out = _tokenize(tok, parse_explicit, [{"prompt": prompt, "chosen": " It was fine.", "rejected": " Bad."}],
                    max_length=24, max_prompt_length=8)  # fmt: skip
    p = out["prompt_input_ids"][0]
    if family in BOS_ADDING:
        assert p == [tok.bos_token_id, *full[-7:]]
    else:  # GPT-2 and Qwen write no BOS: the last 8 tokens, as before
        assert p == full[-8:]
    assert out["prompt_tokens"][0] == len(full) and out["prompt_len"][0] == 8


def test_an_empty_batch_tokenizes_to_nothing(family_tokenizers):
    """A fast tokenizer raises IndexError on an empty list; an empty batch (or an SFT split with no records) is
    no rows."""
    tok = family_tokenizers("llama2", None)
    assert joint_ids(tok, [], []) == [] and prompt_ids(tok, []) == []


def _single_token_word(tok) -> str:
    """A word the tokenizer holds as one token after "I saw ", e.g. "the"."""
    before = len(tok("I saw")["input_ids"])
    for word in ("the", "and", "that", "this", "was", "movie", "film"):
        if len(tok(f"I saw {word}")["input_ids"]) == before + 1:
            return word
    raise AssertionError("no single-token word")


@pytest.mark.parametrize("family", FAMILIES)
def test_a_token_merged_across_the_boundary_goes_to_the_response(family_tokenizers, family):
    tok = family_tokenizers(family, None)
    word = _single_token_word(tok)
    prompt, chosen, rejected = f"I saw {word[0]}", f"{word[1:]} end.", f"{word[1:]} start."
    ((p, (c, r), moved),) = joint_ids(tok, [prompt], [[chosen, rejected]])
    assert moved >= 1, "the prompt's last token was merged with the response's first"
    assert p + c == _joint(tok, prompt, chosen) and p + r == _joint(tok, prompt, rejected)
    assert tok.decode([c[0]]).strip() == word  # the merged token is scored as response
    assert p == prompt_ids(tok, [prompt])[0][: len(p)]


def test_boundary_merges_are_counted_in_the_audit(tmp_path, family_tokenizers):
    tok = family_tokenizers("llama2", None)
    word = _single_token_word(tok)
    rows = synthetic_pairs(6) + [
        {"prompt": f"Pair {i}: I saw {word[0]}", "chosen": f"{word[1:]} good.", "rejected": f"{word[1:]} bad."}
        for i in range(3)
    ]
    dm = make_datamodule(write_jsonl(tmp_path / "p.jsonl", rows), tok, setup=True)
    assert dm.report["splits"]["train"]["boundary_merges"] == 3
    from dpo_lightning.data.audit import format_report, summary_line

    assert "token merged across the prompt/response boundary (scored as response): 3 pairs" in format_report(dm.report)
    assert "3 pairs with a token merged across the prompt/response boundary" in summary_line(dm.report)


@pytest.mark.parametrize("family", ["gpt2", "gpt2-files"])
def test_gpt2_byte_level_ids_are_unchanged_where_they_were_right(family_tokenizers, family):
    """GPT-2's byte-level BPE: prompt and response tokenized apart gave the joint ids already (HH prompts end in
    "Assistant:", answers start with a space); the joint tokenization must give exactly those ids."""
    tok = family_tokenizers(family, None)
    triples = [(r["prompt"], r["chosen"], r["rejected"]) for r in synthetic_pairs(32)]
    if HH_TEST.exists():
        import gzip
        import itertools

        with gzip.open(HH_TEST, "rt") as f:
            for line in itertools.islice(f, 48):
                try:
                    triples.append(parse_hh(json.loads(line)))
                except ValueError:
                    continue
    prompts = [t[0] for t in triples]
    got = joint_ids(tok, prompts, [[c, r] for _, c, r in triples])
    assert [g[0] for g in got] == prompt_ids(tok, prompts)
    assert [g[1][0] for g in got] == response_ids(tok, [t[1] for t in triples])
    assert [g[1][1] for g in got] == response_ids(tok, [t[2] for t in triples])
    assert all(g[2] == 0 for g in got)


@pytest.mark.parametrize("family", ["llama2", "qwen2"])
def test_sft_rows_are_the_joint_tokenization(family_tokenizers, family):
    """SFT rows take the preference data's cut: with a SentencePiece tokenizer the response is not re-tokenized on
    its own (no dummy "▁" before "Sure"), and an empty prompt (a text record) still scores every token."""
    from dpo_lightning.data.sft_data import tokenize_sft
    from dpo_lightning.logps import IGNORE_INDEX

    tok = family_tokenizers(family, None)
    prompt, response = PAIRS[1][0], PAIRS[1][1]  # "...two?\n" + "Sure: four"
    with_prompt, text = tokenize_sft(tok, [response, response], [prompt, ""], max_length=512)
    assert with_prompt["input_ids"] == _joint(tok, prompt, response)
    ((p, (r,), _),) = joint_ids(tok, [prompt], [[response]])
    assert with_prompt["labels"] == [IGNORE_INDEX] * len(p) + r
    if family == "llama2":  # what tokenizing the response alone gives: "▁Sure", not the in-context "Sure"
        assert r != response_ids(tok, [response])[0]
    assert text["input_ids"] == _joint(tok, "", response) and text["labels"][1:] == text["input_ids"][1:]


def test_a_tokenizer_that_cannot_be_loaded_is_a_config_error(tmp_path):
    """A wrong data.tokenizer path is a UserError (one line and exit 2 from the CLI), not a bare ValueError."""
    from dpo_lightning.errors import ConfigError
    from dpo_lightning.tokenizer import load_tokenizer

    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"could not load a tokenizer from '.*empty'"):
        load_tokenizer(str(tmp_path / "empty"))


def test_a_tokenizer_without_eos_is_a_config_error(family_tokenizers):
    """Responses end with EOS: a data.tokenizer that has none is said at tokenization, as a UserError."""
    import copy

    from dpo_lightning.errors import ConfigError

    tok = copy.deepcopy(family_tokenizers("llama2", None))
    tok.eos_token = None
    with pytest.raises(ConfigError, match="the tokenizer has no eos_token"):
        joint_ids(tok, ["Hi"], [["there"]])
