"""Benchmarks: our DPO step's throughput and memory, its levers, and a side-by-side run against TRL.

    make bench                                   # the full run: reports/bench/{results.json,README.md,*.png}
    python -m dpo_lightning.bench --quick        # toy sizes, seconds: checks the harness, not the speed

``step`` needs only torch, lightning and transformers (it is the part a GPU session runs); ``trl_side`` is the
only module that imports ``trl``, and only inside its worker.
"""
