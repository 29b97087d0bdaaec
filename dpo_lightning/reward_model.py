"""A learned reward model as a :class:`~dpo_lightning.reward.Reward`: a local sequence-classification directory.

    reward = load_reward("runs/rm")          # AutoModelForSequenceClassification + its tokenizer, from disk

This is the reward-model form TRL and OpenRLHF train and score with: a transformer whose classification head
reads the last real token of prompt + completion. A head with one output is the reward; with several,
``label`` picks the logit used: its index (e.g. 1, the positive class of a two-class sentiment model) or its name
in the model config's ``label2id`` (e.g. ``"POSITIVE"``). Loading is local-only
with remote code off and safetensors preferred; scoring is batched, without gradients, on the given device.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from dpo_lightning.reward import RewardError, reward_texts


class SequenceClassifierReward:
    """Score texts with a local ``AutoModelForSequenceClassification`` directory (the tokenizer beside it)."""

    def __init__(
        self,
        path: str | Path,
        *,
        device: str | torch.device | None = None,
        batch_size: int = 32,
        text: str = "prompt+completion",
        label: int | str | None = None,
        max_length: int | None = None,
    ):
        """
        Args:
            path: a directory written by ``save_pretrained`` (model and tokenizer).
            device: where the model runs; ``None``: the CPU.
            batch_size: texts per forward pass.
            text: ``"prompt+completion"`` (the default: a reward model reads the whole exchange) or
                ``"completion"``.
            label: which logit is the reward, by index or by name (the config's ``label2id``); ``None`` requires a
                one-output head.
            max_length: tokens kept per text, cut from the left so the completion's end is always read;
                ``None``: the model's position limit.
        """
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        reward_texts([], [], text)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
            self.model = AutoModelForSequenceClassification.from_pretrained(
                path, trust_remote_code=False, local_files_only=True
            )
        except (OSError, ValueError) as err:
            raise RewardError(
                f"reward {str(path)!r}: not a sequence-classification model directory ({type(err).__name__}: {err})"
            ) from None
        num_labels = self.model.config.num_labels
        if label is None and num_labels != 1:
            raise RewardError(f"reward {str(path)!r}: the head has {num_labels} outputs; set 'label' to the one to use")
        if isinstance(label, str):
            names = dict(self.model.config.label2id or {})
            if label not in names:
                raise RewardError(f"reward {str(path)!r}: label {label!r} is not one of the head's {sorted(names)}")
            label = names[label]
        self.label = 0 if label is None else int(label)
        if not 0 <= self.label < num_labels:
            raise RewardError(f"reward {str(path)!r}: label {label} is outside the head's {num_labels} outputs")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:  # the head finds each row's last real token through it
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.tokenizer.padding_side = "right"
        self.tokenizer.truncation_side = "left"
        limit = getattr(self.model.config, "max_position_embeddings", None) or getattr(
            self.model.config, "n_positions", None
        )
        self.max_length = int(max_length or limit or 512)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.model.to(self.device).eval().requires_grad_(False)
        self.batch_size, self.text = int(batch_size), text

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        texts = reward_texts(prompts, completions, self.text)
        out = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                texts[start : start + self.batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            out.append(self.model(**enc).logits[:, self.label].float().cpu())
        return torch.cat(out) if out else torch.zeros(0)
