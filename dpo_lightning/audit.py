"""The ``dpo-lightning audit`` command: the data report of a fit config, before a step is trained.

    dpo-lightning audit --config experiments/tiny_cpu.yaml [--data.max_length 256 ...] [--out DIR]

Reads the same config as ``fit`` (its ``data:`` and ``run:`` sections, and ``model.policy``, whose tokenizer ``fit``
takes when ``data.tokenizer`` is unset; the rest is ignored), prepares the data exactly as ``fit`` would (same
tokenizer, same cache), prints the report of ``data/audit.py`` and writes
``<--out or run.dir>/data_audit.json`` and ``data_lengths.png``; exits with 1 when a configured ``data.max_*_rate``
threshold is crossed. The command lives here, beside the CLI, so that the data package never imports the CLI.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

KEEP_SECTIONS = ("data", "run")  # of a fit config, what the audit reads


def _filtered_config(path: str) -> str:
    """A fit config reduced to the sections the audit reads, as a YAML string for jsonargparse."""
    import yaml

    from dpo_lightning.errors import ConfigError

    try:
        config = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"--config {path}: cannot be read ({err})") from None
    kept = {k: v for k, v in config.items() if k in KEEP_SECTIONS}
    if isinstance(config.get("model"), dict) and "policy" in config["model"]:
        kept["model"] = {"policy": config["model"]["policy"]}
    return yaml.safe_dump(kept)


def parse_args(argv: list[str]) -> Any:
    from jsonargparse import ActionConfigFile, ArgumentParser

    from dpo_lightning.cli import RunConfig, tokenizer_from_policy
    from dpo_lightning.data.datamodule import PreferenceDataModule

    parser = ArgumentParser(prog="dpo-lightning audit", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--config", action=ActionConfigFile, help="the fit config (repeatable; data/run sections)")
    parser.add_class_arguments(PreferenceDataModule, "data")
    parser.add_class_arguments(RunConfig, "run")
    parser.add_argument("--model.policy", type=str | None, default=None, help="fit's model.policy (its tokenizer)")
    parser.add_argument("--out", type=str | None, default=None, help="where to write (default: run.dir)")
    args, i = [], 0
    while i < len(argv):
        word = argv[i]
        if word == "--config" and i + 1 < len(argv):
            args += ["--config", _filtered_config(argv[i + 1])]
            i += 2
            continue
        args.append(f"--config={_filtered_config(word[9:])}" if word.startswith("--config=") else word)
        i += 1
    config = parser.parse_args(args)
    tokenizer_from_policy(config)  # data.tokenizer unset: the policy directory's tokenizer, as fit takes it
    return parser.instantiate(config), config


def main(argv: list[str] | None = None) -> int:
    """``dpo-lightning audit``: print and write the report; exit 1 when a configured threshold is crossed."""
    from dpo_lightning.data.audit import format_report, write_report

    init, config = parse_args(list(sys.argv[1:] if argv is None else argv))
    dm = init.data
    dm.prepare(enforce_thresholds=False)
    report = dm.report
    print(format_report(report))
    run = config.run
    out = config.out or run.dir or f"runs/{run.name or 'data'}-audit-{time.strftime('%Y%m%d-%H%M%S')}"
    paths = write_report(report, out, dm.stats.get("train"))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 1 if report["violations"] else 0
