"""Benchmarks: our DPO step's throughput and memory, its levers, and side-by-side runs against TRL.

    make bench                                   # the full run: reports/bench/{results.json,README.md,*.png}
    python -m dpo_lightning.bench --quick        # toy sizes, a few minutes: checks the harness, not the speed

One file, one idea. The run: ``__main__`` (sections, machine facts), ``suite`` (sizes, worker processes, turns,
ratios over rounds), ``assets`` (tokenizer, saved weights, pairs both sides load). Workers, one process per
measurement: ``ours_side`` (our data module + module under a Lightning Trainer), ``trl_side`` (TRL's
DPOTrainer), ``step`` (the bare step loop, also the GPU entry point), ``flops`` (the matmul rate), ``profile``,
``lora``, ``pipeline``. What they measure with: ``probes`` (RSS, step timer, token counts, profiler),
``patches`` (bench-only switches of the step), ``flops`` (the FLOPs a step needs). Sections: ``vs_trl`` (trl),
``side_by_side`` (the layouts vs TRL, MFU, the issue-12 targets), ``profile``, ``sections`` (levers, sweep,
processes, pipeline), ``gpu``, ``lora``. Report: ``report`` with ``report_format`` and ``plots``. Stand-alone:
``chunked_head`` (the log-prob head's memory), ``ppo_vs_dpo`` (a PPO step against a DPO step).

``step`` needs only torch, lightning and transformers (it is the part a GPU session runs); ``trl_side`` is the
only module that imports ``trl``, and only inside its worker. Nothing here imports the tests.
"""
