"""SFT: which tokens are targets, padding, the data module on files and in memory, and that the loss falls.

python -m pytest -q tests/test_sft.py      # ~15 s on 2 CPU cores
"""

import lightning.pytorch as pl
import pytest
import torch

from dpo_lightning.data.tokenize import prompt_ids, response_ids
from dpo_lightning.errors import ConfigError, DataError
from dpo_lightning.logps import IGNORE_INDEX
from dpo_lightning.models import build_causal_lm
from dpo_lightning.sft import SFTCollator, SFTDataModule, SFTModule, sft_lr_factor, tokenize_sft
from dpo_lightning.tokenizer import load_tokenizer

from helpers import TINY_GPT2, synthetic_pairs, write_jsonl


def _trainer(steps: int) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                      num_sanity_val_steps=0)  # fmt: skip


def test_prompt_tokens_are_context_and_eos_ends_the_response(tiny_tokenizer):
    tok = tiny_tokenizer
    (row,) = tokenize_sft(tok, [" great fine."], [" The film was"], max_length=64)
    p = prompt_ids(tok, [" The film was"])[0]
    r = response_ids(tok, [" great fine."])[0]  # ends with EOS
    assert row["input_ids"] == p + r
    assert row["labels"] == [IGNORE_INDEX] * len(p) + r
    (no_eos,) = tokenize_sft(tok, [" great fine."], [" The film was"], max_length=64, add_eos=False)
    assert no_eos["input_ids"] == p + r[:-1] and no_eos["labels"][-1] != tok.eos_token_id


def test_whole_text_and_truncation(tiny_tokenizer):
    tok = tiny_tokenizer
    (full,) = tokenize_sft(tok, ["The film was great fine lovely."], max_length=64)
    assert full["input_ids"][0] == tok.bos_token_id  # an empty prompt: the BOS predicts the first token
    assert all(x != IGNORE_INDEX for x in full["labels"][1:]) and full["input_ids"][-1] == tok.eos_token_id
    (cut,) = tokenize_sft(tok, ["The film was great fine lovely."], max_length=3)
    assert cut["input_ids"] == full["input_ids"][:3]  # a text cut short does not end with EOS
    assert cut["input_ids"][-1] != tok.eos_token_id


def test_collator_pads_right_and_ignores_padding():
    batch = SFTCollator(pad_token_id=0)([
        {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]},
        {"input_ids": [8], "labels": [8]},
    ])  # fmt: skip
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]


def test_lr_schedule_shape():
    assert sft_lr_factor(0, 4, 100, "cosine") == pytest.approx(0.2)  # (0 + 1) / (4 + 1)
    assert sft_lr_factor(4, 4, 100, "cosine") == pytest.approx(1.0)
    assert sft_lr_factor(52, 4, 100, "cosine") == pytest.approx(0.5)  # (52 − 4) / (100 − 4) = ½: ½(1 + cos ½π)
    assert sft_lr_factor(100, 4, 100, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert sft_lr_factor(50, 4, 100, "constant") == 1.0


def test_datamodule_reads_preference_files_for_preferred_ft(tmp_path, tiny_tokenizer):
    """Preferred-FT reads a {prompt, chosen, rejected} file with response_field=chosen, prompt_field=prompt."""
    path = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(40))
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    dm = SFTDataModule(train_files=str(path), response_field="chosen", prompt_field="prompt",
                       tokenizer=str(tmp_path / "tok"), max_length=64, batch_size=8, val_fraction=0.1)  # fmt: skip
    dm.setup()
    assert len(dm.rows["train"]) == 36 and len(dm.rows["val"]) == 4
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 8
    assert (batch["labels"][:, 0] == IGNORE_INDEX).all()  # every record starts with its prompt
    with pytest.raises(DataError, match="no field 'text'"):
        SFTDataModule(train_files=str(path), format="text", tokenizer=str(tmp_path / "tok")).setup()


def test_datamodule_trains_a_tokenizer_when_none_is_given(tmp_path):
    """As the preference data module does: no tokenizer directory -> a byte-level BPE on the training text."""
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": r["prompt"] + r["chosen"]} for r in synthetic_pairs(60)])
    dm = SFTDataModule(train_files=str(path), tokenizer_vocab_size=300, max_length=32, val_fraction=0)
    assert 256 < len(dm.tokenizer) <= 300  # available before setup: a model built from a config needs it
    dm.setup()
    assert len(dm.rows["train"]) == 60 and dm.rows["val"] == []


def test_loss_decreases_on_a_tiny_corpus(tiny_tokenizer, tmp_path):
    """30 AdamW steps on 64 short synthetic reviews lower the loss on a fixed batch by a wide margin; the
    trained model is saved as a Hugging Face directory that loads back to the same weights."""
    pl.seed_everything(0, verbose=False)
    texts = [r["prompt"] + r["chosen"] for r in synthetic_pairs(64)]
    dm = SFTDataModule.from_texts(texts, tokenizer=tiny_tokenizer, max_length=32, batch_size=16, val_fraction=0)
    module = SFTModule(
        policy_config=TINY_GPT2,
        disable_dropout=True,
        lr=3e-3,
        warmup_steps=2,
        tokenizer=tiny_tokenizer,
        save_dir=str(tmp_path / "sft"),
    )
    dm.setup()
    batch = SFTCollator(tiny_tokenizer.pad_token_id)(dm.rows["train"][:16])
    with torch.no_grad():
        before = module.model_step(batch)[0].item()
    _trainer(30).fit(module, dm)
    with torch.no_grad():
        after = module.model_step(batch)[0].item()
    assert after < before - 1.0, (before, after)
    assert module.policy.config.vocab_size == len(tiny_tokenizer)
    loaded = build_causal_lm(str(tmp_path / "sft"))
    torch.testing.assert_close(loaded.state_dict(), module.policy.state_dict())
    assert load_tokenizer(str(tmp_path / "sft")).eos_token_id == tiny_tokenizer.eos_token_id


def test_bad_settings(tiny_tokenizer):
    with pytest.raises(ValueError, match="lr"):
        SFTModule(policy_config=TINY_GPT2, lr=0.0)
    with pytest.raises(ValueError, match="prompts but"):
        SFTDataModule.from_texts(["a", "b"], prompts=["x"], tokenizer=None)
    with pytest.raises(ConfigError, match=r"data.val_fraction must be in \[0, 1\)"):
        SFTDataModule(val_fraction=1.0)  # before: an IndexError at setup, nothing left to train on
    with pytest.raises(DataError, match="holds out 1, leaving none to train on"):
        SFTDataModule.from_texts(["one record"], tokenizer=tiny_tokenizer, val_fraction=0.5).setup()


def test_a_record_left_without_targets_is_said(tiny_tokenizer):
    """A prompt that fills max_length (max_prompt_length unset) leaves the response no token: the record trains
    nothing, and setup says how many such records there are instead of keeping quiet."""
    long_prompt = " ".join(["The film was"] * 8)
    dm = SFTDataModule.from_texts([" great.", " fine."], prompts=[long_prompt, "Short:"], tokenizer=tiny_tokenizer,
                                  max_length=8, val_fraction=0)  # fmt: skip
    with pytest.warns(UserWarning, match=r"sft data \(train\): 1 of 2 record\(s\) have no target token left"):
        dm.setup()
    assert [set(r["labels"]) == {IGNORE_INDEX} for r in dm.rows["train"]] == [True, False]


def test_formats_text_messages_and_preference_pairs(tmp_path, tiny_tokenizer):
    """The same (prompt, response) from three record kinds, format auto: a {messages} conversation (rendered with
    the plain chat template: the prompt ends in "\\n\\nAssistant:", the answer is the response), an HH pair
    (prompt up to the last assistant turn, chosen response) and an explicit pair; a {text} record is all target."""
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    turns = [{"role": "user", "content": "Review 1: The film was"}, {"role": "assistant", "content": "great fine."}]
    files = {
        "messages": [{"messages": turns}],
        "hh": [{"chosen": "\n\nHuman: Review 1: The film was\n\nAssistant: great fine.",
                "rejected": "\n\nHuman: Review 1: The film was\n\nAssistant: awful."}],
        "explicit": [{"prompt": "\n\nUser: Review 1: The film was\n\nAssistant:", "chosen": " great fine.",
                      "rejected": " awful."}],
        "text": [{"text": "The film was great fine."}],
    }  # fmt: skip
    rows = {}
    for kind, records in files.items():
        dm = SFTDataModule(train_files=str(write_jsonl(tmp_path / f"{kind}.jsonl", records)),
                           tokenizer=str(tmp_path / "tok"), max_length=64, val_fraction=0)  # fmt: skip
        dm.setup()
        rows[kind] = dm.rows["train"][0]
        assert dm._records["train"][0]["response"].strip() == ("The film was great fine." if kind == "text"
                                                                else "great fine.")  # fmt: skip
    assert rows["messages"]["input_ids"] == rows["explicit"]["input_ids"]
    assert rows["messages"]["labels"] == rows["explicit"]["labels"]
    assert IGNORE_INDEX not in rows["text"]["labels"][1:]  # all target after the BOS an empty prompt becomes
    assert rows["hh"]["labels"].count(IGNORE_INDEX) > 0 and rows["hh"]["labels"][-1] == tiny_tokenizer.eos_token_id


def test_bad_records_are_named_or_skipped_and_counted(tmp_path, tiny_tokenizer):
    """A conversation that ends with the user is named by file, row (as fit's errors name it: Source.where) and
    field; with on_bad_row skip it is left out and counted by kind."""
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad = {"messages": [{"role": "user", "content": "hi"}]}
    path = write_jsonl(tmp_path / "chat.jsonl", [good, bad, good])
    settings = {"train_files": str(path), "tokenizer": str(tmp_path / "tok"), "val_fraction": 0}
    named = r"chat.jsonl, line 2, field 'messages': .*does not end with an assistant"  # 1-based, as `sed -n 2p`
    with pytest.raises(DataError, match=named):
        SFTDataModule(**settings).setup()
    dm = SFTDataModule(**settings, on_bad_row="skip")
    dm.setup()
    assert len(dm.rows["train"]) == 2 and dm.skipped["train"] == {"no_assistant_turn": 1}


def test_truncation_is_the_preference_datas(tiny_tokenizer):
    """With max_prompt_length, a long prompt keeps its last tokens (keep_end) and the response its first, as
    fit cuts a pair: prompt 20 tokens -> 8, response -> 16 - 8."""
    from dpo_lightning.data.tokenize import truncate_row

    prompt, response = " ".join(["The film was"] * 7), " great" * 12
    (row,) = tokenize_sft(tiny_tokenizer, [response], [prompt], max_length=16, max_prompt_length=8)
    p, r = prompt_ids(tiny_tokenizer, [prompt])[0], response_ids(tiny_tokenizer, [response])[0]
    assert len(p) > 8 and len(r) > 8
    tp, tr = truncate_row(p, r, max_length=16, max_prompt_length=8, truncation_mode="keep_end")
    assert row["input_ids"] == tp + tr and len(row["input_ids"]) == 16
    assert row["labels"] == [IGNORE_INDEX] * len(tp) + tr


def test_validation_loss_is_the_per_token_mean_of_the_split(tiny_tokenizer):
    """val/loss over 3 records in batches of 2 is Σ NLL / Σ target tokens over the 3 (not a mean of batch means)."""
    pl.seed_everything(0, verbose=False)
    texts = [r["prompt"] + r["chosen"] for r in synthetic_pairs(3)]
    dm = SFTDataModule.from_texts(texts[:1], tokenizer=tiny_tokenizer, val_responses=[texts[1], texts[2] * 3, texts[0]],
                                  max_length=64, batch_size=2)  # fmt: skip
    module = SFTModule(policy_config=TINY_GPT2, tokenizer=tiny_tokenizer)
    dm.setup()
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    (logged,) = trainer.validate(module, dm, verbose=False)
    with torch.no_grad():
        sums, counts = module.eval().row_losses(SFTCollator(tiny_tokenizer.pad_token_id)(dm.rows["val"]))
    assert logged["val/loss"] == pytest.approx(float(sums.sum() / counts.sum()), rel=1e-5)


def test_policy_directory_loads_with_fit_s_settings(assets):
    """``sft`` loads ``model.policy`` as ``fit`` does: the weights in ``torch_dtype`` (the saved fp32 tiny GPT-2 comes
    back as bf16 when asked), the attention kernel named by ``attn_implementation``, remote code refused unless
    asked for (the default)."""
    from dpo_lightning.sft import SFTModule

    module = SFTModule(policy=str(assets / "policy"), torch_dtype="bfloat16", attn_implementation="eager")
    assert {p.dtype for p in module.policy.parameters()} == {torch.bfloat16}
    assert module.policy.config._attn_implementation == "eager"
    assert SFTModule(policy=str(assets / "policy")).policy.config._attn_implementation == "sdpa"
    assert module.hparams.trust_remote_code is False


def test_training_order_resumes_mid_epoch(tiny_tokenizer):
    """A checkpoint taken after 2 of an epoch's 5 batches holds the loader's position: a fresh data module loaded
    with it yields exactly the other 3 batches of that epoch (before: a plain shuffled DataLoader, so a resumed
    `sft` run started the epoch over and never saw its last batches)."""
    texts = [r["prompt"] + r["chosen"] for r in synthetic_pairs(20)]

    def data() -> SFTDataModule:
        dm = SFTDataModule.from_texts(texts, tokenizer=tiny_tokenizer, max_length=32, batch_size=4, val_fraction=0)
        dm.setup()
        return dm

    first = data()
    batches = iter(first.train_dataloader())
    seen = [next(batches)["index"].tolist() for _ in range(2)]
    state = first.state_dict()
    rest = [b["index"].tolist() for b in batches]
    assert len(rest) == 3 and sorted(i for b in seen + rest for i in b) == list(range(20))
    resumed = data()
    resumed.load_state_dict(state)
    assert [b["index"].tolist() for b in resumed.train_dataloader()] == rest


def test_a_jinja_chat_template_with_a_trained_tokenizer(tmp_path):
    """data.chat_template (Jinja) with data.tokenizer null: the BPE trains on the plain rendering, then the records
    are rendered with the template (before: an AttributeError traceback, the stand-in tokenizer cannot render)."""
    turns = [[{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"hello there {i}"}]
             for i in range(12)]  # fmt: skip
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": t} for t in turns])
    template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")  # fmt: skip
    dm = SFTDataModule(train_files=str(path), chat_template=template, tokenizer_vocab_size=300, val_fraction=0)
    dm.setup()
    assert dm._records["train"][3] == {"prompt": "<|user|>hi 3<|assistant|>", "response": "hello there 3"}
    assert len(dm.rows["train"]) == 12 and len(dm.tokenizer) <= 300
