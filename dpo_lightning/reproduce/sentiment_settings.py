"""Part 2's sizes and its method runs: :class:`Settings` (``FULL``, ``QUICK``), :class:`Method`, :func:`methods`.

Every run feeds a claim (``sentiment_claims``): DPO at several β (a)–(c), IPO at ``claim_beta`` (d), DPO,
cDPO and rDPO on the pairs with ``flip_rate`` of their labels flipped (e), Preferred-FT and Unlikelihood swept
over learning rates (b), PPO-GT at several KL coefficients (a). The cost of each size is in ``sentiment.py``'s
docstring (the cost model).
"""

from __future__ import annotations

from dataclasses import dataclass

LOG_PREFIX = "[part 2]"


@dataclass(frozen=True)
class Settings:
    """Every size and rate of the experiment; ``FULL`` and ``QUICK`` below are the two used."""

    train_reviews: int | None  # reviews for the classifier, the tokenizer and SFT (None: all 25,000)
    test_reviews: int | None  # reviews the classifier's accuracy is measured on (None: all 25,000)
    vocab_size: int  # byte-level BPE vocabulary
    n_layer: int  # GPT-2 blocks
    n_embd: int  # width
    n_head: int
    context: int  # SFT sequence length and n_positions: prompt + new tokens fit in it
    sft_steps: int
    sft_batch: int  # reviews per SFT step
    sft_lr: float
    pref_prompts: int  # training prompts; × 6 pairs each
    max_new_tokens: int  # length of every sampled continuation (training pairs and evaluation)
    betas: tuple[float, ...]  # β of the DPO runs; must hold claim_beta
    method_steps: int  # optimizer steps per offline method run
    method_batch: int  # preference pairs (or chosen responses, for Preferred-FT) per step
    method_lr: float  # AdamW peak learning rate, reached after a linear warmup
    warmup_steps: int
    method_schedule: str  # after warmup: "constant", or "cosine" decay to 0 at the last step
    eval_steps: tuple[int, ...]  # steps at which each run is evaluated (step 0, the SFT model, is shared)
    eval_prompts: int  # test prompts, one sample each: deciding ones (quick: tuning ones; sentiment_data)
    workers: int = 2  # method runs in parallel, one process and one thread each
    samples_per_prompt: int = 4  # Appendix C.1: 4 samples, so 6 pairs, per prompt
    min_prefix: int = 2  # Appendix C.1: prefixes of 2–8 tokens (cut forward to the end of a word)
    max_prefix: int = 8
    claim_beta: float = 0.1  # the β at which IPO (d) and the label-noise runs (e) are compared with DPO
    flip_rate: float = 0.25  # (e): share of the pairs whose labels are flipped (seeded, before any run)
    pft_lrs: tuple[float, ...] = (1e-3, 4e-3)  # Preferred-FT sweep (× steps: its checkpoints)
    ul_lrs: tuple[float, ...] = (1e-3,)  # Unlikelihood sweep
    ppo_kl_coefs: tuple[float, ...] = (0.05, 0.2)  # PPO-GT runs (sentiment_ppo.py)
    ppo_steps: int = 4  # PPO optimizer steps (rollout phases) per run
    ppo_rollout_prompts: int = 16  # prompts per PPO step
    ppo_lr: float = 1e-3
    ppo_eval_steps: tuple[int, ...] = (2, 4)
    bon_ns: tuple[int, ...] = (4, 16, 64)  # best-of-N from the SFT model: frontier points and claim (f)
    bon_prompts: int = 16  # deciding prompts best-of-N samples on (the first bon_prompts of them)
    sft_threads: int = 1  # torch threads of SFT, which runs alone (FULL: 2; everything else runs one thread)
    n_boot: int = 2000  # bootstrap replicates


FULL = Settings(
    train_reviews=None, test_reviews=None, vocab_size=4096, n_layer=4, n_embd=128, n_head=4, context=48,
    sft_steps=360, sft_batch=64, sft_lr=3e-3, pref_prompts=640, max_new_tokens=32, betas=(0.05, 0.1, 1.0),
    method_steps=60, method_batch=64, method_lr=5e-4, warmup_steps=6, method_schedule="cosine",
    eval_steps=(20, 40, 60), eval_prompts=384, pft_lrs=(5e-4, 3e-3, 1e-2), ul_lrs=(5e-4,),
    ppo_kl_coefs=(0.03, 0.1, 0.3),
    ppo_steps=24, ppo_rollout_prompts=48, ppo_lr=5e-4, ppo_eval_steps=(8, 16, 24), bon_prompts=80, sft_threads=2,
)  # fmt: skip
QUICK = Settings(
    train_reviews=5000, test_reviews=2000, vocab_size=1024, n_layer=2, n_embd=64, n_head=2, context=32,
    sft_steps=100, sft_batch=32, sft_lr=3e-3, pref_prompts=160, max_new_tokens=16, betas=(0.05, 0.1, 1.0),
    method_steps=20, method_batch=32, method_lr=2e-3, warmup_steps=2, method_schedule="cosine",
    eval_steps=(10, 20), eval_prompts=64, workers=1,  # runs of a few seconds: a worker's start-up costs more
    bon_prompts=8, n_boot=500,
)  # fmt: skip


@dataclass(frozen=True)
class Method:
    """One training run: a preference loss at one β, Preferred-FT (``kind`` "sft") or PPO-GT (``kind`` "ppo")."""

    name: str  # curve label: "DPO", "IPO", "DPO (noisy)", "cDPO (noisy)", "rDPO (noisy)", "Preferred-FT", ...
    loss: str
    beta: float | None = None
    eps: float = 0.0  # label smoothing ε (cDPO, rDPO)
    kind: str = "preference"  # "preference" (PreferenceModule), "sft" (Preferred-FT), "ppo" (PPO-GT)
    lr: float | None = None  # None: Settings.method_lr
    kl_coef: float | None = None  # PPO-GT's KL coefficient
    noisy: bool = False  # trained on the flipped pairs (claim e)

    @property
    def key(self) -> str:
        """A unique run label: the name, then what distinguishes runs of the same name."""
        parts = []
        if self.beta is not None:
            parts.append(f"β={self.beta:g}")
        if self.eps:
            parts.append(f"ε={self.eps:g}")
        if self.kl_coef is not None:
            parts.append(f"kl={self.kl_coef:g}")
        if self.lr is not None:
            parts.append(f"lr={self.lr:g}")
        return " ".join([self.name, *parts])


def methods(cfg: Settings) -> list[Method]:
    """Every run of the experiment, in start order: a clean-pairs and a noisy-pairs preference run first (each
    computes its shared reference table while nothing else needs it), the long PPO runs next."""
    b = cfg.claim_beta
    if b not in cfg.betas:
        from dpo_lightning.errors import ConfigError

        raise ConfigError(f"Part 2 settings: claim_beta {b} must be one of betas {cfg.betas}")
    out = [Method("DPO", "dpo", b), Method("DPO (noisy)", "dpo", b, noisy=True)]
    out += [Method("PPO-GT", "ppo", kind="ppo", kl_coef=c) for c in cfg.ppo_kl_coefs]
    out += [Method("DPO", "dpo", x) for x in cfg.betas if x != b]
    out += [Method("IPO", "ipo", b)]
    out += [Method("cDPO (noisy)", "cdpo", b, cfg.flip_rate, noisy=True)]
    out += [Method("rDPO (noisy)", "rdpo", b, cfg.flip_rate, noisy=True)]
    out += [Method("Preferred-FT", "sft", kind="sft", lr=lr) for lr in cfg.pft_lrs]
    return out + [Method("Unlikelihood", "unlikelihood", b, lr=lr) for lr in cfg.ul_lrs]
