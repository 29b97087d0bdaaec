"""TRL's side of the comparison: its DPOTrainer, run in its own process so its peak RSS is its own.

    python -m dpo_lightning.bench.trl_side SPEC.json OUT.json

Both sides load the same saved random weights and tokenizer (``assets.prepare``) and train on the same tokenized
HH pairs in the same batches (TRL gets them in the order our data module's sampler draws them, with
``train_sampling_strategy="sequential"``), with the same loss (sigmoid DPO, β from the spec), AdamW at a constant
learning rate, gradient clipping at 1.0, fp32, no gradient checkpointing and the same thread count. TRL's own
defaults differ from that on two points (bf16 autocast and gradient checkpointing on): both are turned off
here so the two sides do equal work. TRL's tokenizer pass is bypassed (``_prepare_dataset`` returns the
pre-tokenized pairs), so the token ids are identical; the equal-work check compares the losses of the first
steps. This is the only module of the package that imports ``trl``, and only inside :func:`run_trl`.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from dpo_lightning.bench.probes import peak_rss_mb, real_tokens, rss_mb, throughput, top_ops


def trl_version() -> str | None:
    """The installed TRL version, without importing it; None when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("trl")
    except PackageNotFoundError:
        return None


def _pairs(spec: dict[str, Any]) -> list[dict[str, list[int]]]:
    rows = json.loads(Path(spec["pairs_file"]).read_text())
    n = spec["batch_size"] * (spec["warmup"] + spec["steps"])
    return rows[:n]


# ---------------------------------------------------------------------------------------------------- TRL
def run_trl(spec: dict[str, Any]) -> dict[str, Any]:
    """TRL's DPOTrainer on the same weights, pairs and settings."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(spec["threads"])
    rows = _pairs(spec)
    ends: list[float] = []
    tokens: list[int] = []
    losses: list[torch.Tensor] = []

    profiled: dict[str, Any] = {}

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

        def on_step_begin(self, args, state, control, **kwargs):
            if spec.get("profile") and state.global_step == spec["warmup"]:
                profiled["prof"] = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                profiled["prof"].__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            if "prof" in profiled and "table" not in profiled:
                profiled["prof"].__exit__(None, None, None)
                profiled["table"] = top_ops(profiled["prof"])
            ends.append(time.perf_counter())

    class BenchDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # already tokenized by the shared assets: identical token ids on both sides

        def training_step(self, model, inputs, *args, **kwargs):
            tokens.append(real_tokens(inputs))
            loss = super().training_step(model, inputs, *args, **kwargs)
            losses.append(loss.detach())
            return loss

    dataset = datasets.Dataset.from_list(
        [
            {
                "prompt_ids": r["prompt_input_ids"],
                "chosen_ids": r["chosen_input_ids"],
                "rejected_ids": r["rejected_input_ids"],
            }
            for r in rows
        ]
    )
    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"])
    ref_model = (
        None if spec.get("reference") == "precomputed" else AutoModelForCausalLM.from_pretrained(spec["model_dir"])
    )
    with tempfile.TemporaryDirectory() as root:
        args = DPOConfig(
            output_dir=root,
            per_device_train_batch_size=spec["batch_size"],
            max_steps=spec["warmup"] + spec["steps"],
            learning_rate=spec["lr"],
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=1.0,
            optim="adamw_torch",
            beta=spec["beta"],
            loss_type=["sigmoid"],
            max_length=spec["max_length"],
            precompute_ref_log_probs=spec.get("reference") == "precomputed",
            train_sampling_strategy="sequential",
            bf16=False,
            gradient_checkpointing=False,
            use_cpu=True,
            report_to="none",
            logging_strategy="no",
            save_strategy="no",
            eval_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=0,
            dataloader_pin_memory=False,
            seed=0,
        )
        trainer = BenchDPOTrainer(
            model=model,
            ref_model=ref_model,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[Timer()],
        )
        torch.set_num_threads(spec["threads"])  # in case accelerate changed it
        rss_before = rss_mb()
        trainer.train()
    result = throughput(ends, tokens, spec["warmup"])
    result.update(
        side="trl",
        losses=[float(x) for x in losses[:3]],
        rss_before_mb=rss_before,
        peak_rss_mb=peak_rss_mb(),
        threads=torch.get_num_threads(),
        trl_version=trl_version(),
    )
    if spec.get("profile"):
        result["profile"] = profiled.get("table")
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec_file, out_file = argv
    spec = json.loads(Path(spec_file).read_text())
    result = run_trl(spec)
    Path(out_file).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
