"""The ``dpo-lightning`` command (also ``python -m dpo_lightning``).

    dpo-lightning fit --config experiments/tiny_cpu.yaml [--config overlay.yaml] [--model.beta 0.5 ...]
    dpo-lightning validate|test --config ... --ckpt_path runs/<run>/checkpoints/last.ckpt
    dpo-lightning audit --config experiments/tiny_cpu.yaml [--data.max_length 256] [--out DIR]
    dpo-lightning export runs/<run>/checkpoints/last.ckpt OUT_DIR     (a Hugging Face model directory)
    dpo-lightning sft --config experiments/tiny_sft.yaml   (the SFT stage; writes <run folder>/export for fit)
    dpo-lightning sweep|compare|reproduce ...   (see ``dpo-lightning <command> --help``)

``fit``/``validate``/``test`` are LightningCLI: every ``__init__`` argument of PreferenceModule (``model.*``),
PreferenceDataModule (``data.*``) and the Trainer (``trainer.*``) is a config key, and a wrong key fails
before anything runs. ``run.*`` names the run folder and the loggers: a CSV log always, and wandb, offline
unless you are logged in or set ``WANDB_MODE``; the run folder is ``run.dir``, else
``<trainer.default_root_dir or runs>/<name>-<time>``. ``sft`` is the same for SFTModule and SFTDataModule.
"""

from __future__ import annotations

import importlib
import netrc
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

RUN_DIR_ENV = "DPO_LIGHTNING_RUN_DIR"  # shared by the processes of one multi-process run

# commands that are not Trainer methods: name -> module with main(argv) -> int
EXTRA_COMMANDS = {
    "sweep": "dpo_lightning.sweep",
    "compare": "dpo_lightning.compare",
    "reproduce": "dpo_lightning.reproduce.__main__",
    "audit": "dpo_lightning.audit",
    "export": "dpo_lightning.export",
    "bench": "dpo_lightning.bench.__main__",
    "iterate": "dpo_lightning.iterative",
    "ppo": "dpo_lightning.ppo.cli",
}


@dataclass
class RunConfig:
    """Where a run writes and how it is named on dashboards."""

    dir: str | None = None
    """Run folder: metrics.csv, config.yaml, checkpoints/, tokenizer/, wandb/. Default
    <trainer.default_root_dir or runs>/<name>-<time> (<name>-<job id> under SLURM or torchrun)."""
    name: str | None = None
    """Run name (wandb display name too). Default <loss>-beta<β>."""
    group: str | None = None
    """wandb group, e.g. the sweep name, so the project page groups related runs."""
    job_type: str | None = None
    """wandb job_type; defaults to the loss name, so runs can be coloured by variant."""
    tags: list[str] = field(default_factory=list)
    """wandb tags."""
    wandb: bool = True
    """Log to wandb (offline unless logged in or WANDB_MODE is set) besides the CSV file."""
    wandb_project: str = "dpo-lightning"
    """wandb project."""
    sweep: str | None = None
    """Name of the sweep this run is a trial of: names it <sweep>-<run id>, groups it per (loss, β) (see
    dpo_lightning/sweeping/identity.py)."""
    csv_flush_every: int = 10
    """Write metrics.csv every this many logged steps, so sweeps can read a run's progress while it runs."""


def configure_wandb_mode() -> str:
    """Offline-first: unless WANDB_MODE is set or a W&B key is configured, log offline (never prompt)."""
    if "WANDB_MODE" not in os.environ and not _wandb_logged_in():
        os.environ["WANDB_MODE"] = "offline"
    os.environ.setdefault("WANDB_SILENT", "true")
    return os.environ.get("WANDB_MODE", "online")


def _wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")  # wandb honours $NETRC; netrc does not
    try:
        auth = netrc.netrc(path).authenticators(os.environ.get("WANDB_BASE_URL", "api.wandb.ai").split("//")[-1])
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return auth is not None


def flat_config(config: dict, prefix: str = "") -> dict:
    """{"model": {"beta": 0.1}} -> {"model.beta": 0.1}: the dotted keys a sweep uses, for the wandb run config."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and "class_path" not in value:
            flat.update(flat_config(value, f"{name}."))
        elif key != "config":  # the --config file paths themselves
            flat[name] = value
    return flat


def default_run_dir(name: str, root: str = "runs") -> str:
    """<root>/<name>-<id>: the scheduler's job id when there is one, so every process of a job picks the same folder."""
    job = os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID", "none")
    if job != "none":
        return f"{root}/{name}-{job}"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by an external launcher without a run id
        from dpo_lightning.errors import ConfigError

        raise ConfigError("run.dir: set --run.dir when a launcher starts the processes, so they share one folder")
    return f"{root}/{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def build_loggers(
    run: RunConfig, loss: str, beta: float | None, settings: dict | None = None, root: str | None = None
) -> tuple[list, str]:
    """The CSV logger (always) and the wandb logger (when enabled and installed), both writing to the run folder:
    ``run.dir``, else ``<root>/<name>-<time>`` (``root``: ``trainer.default_root_dir``, default ``runs``)."""
    from lightning.pytorch.loggers import CSVLogger

    if run.sweep:
        from dpo_lightning.sweeping.identity import apply_sweep_defaults

        run = apply_sweep_defaults(run, loss, beta)
    name = run.name or (f"{loss}-beta{beta:g}" if beta is not None else loss)
    launching = RUN_DIR_ENV not in os.environ  # False in the processes Lightning starts for a multi-process run
    run_dir = run.dir or os.environ.get(RUN_DIR_ENV) or default_run_dir(name, root or "runs")
    os.environ[RUN_DIR_ENV] = run_dir  # child processes of a multi-process launch reuse the same folder
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    metrics = Path(run_dir) / "metrics.csv"
    if launching and metrics.exists():  # a resumed run: Lightning's CSV logger would overwrite the history
        metrics.rename(metrics.with_name(f"metrics.before-{time.strftime('%Y%m%d-%H%M%S')}.csv"))
    loggers = [CSVLogger(save_dir=run_dir, name="", version="", flush_logs_every_n_steps=run.csv_flush_every)]
    if run.wandb:
        try:
            from lightning.pytorch.loggers import WandbLogger

            loggers.append(
                WandbLogger(
                    project=run.wandb_project,
                    name=name,
                    group=run.group,
                    job_type=run.job_type or loss,
                    tags=run.tags or None,
                    save_dir=run_dir,
                    config=settings,  # dotted keys (model.beta, data.label_noise) as a wandb sweep names them
                )
            )
        except ModuleNotFoundError:  # wandb is optional at run time (e.g. a GPU image without it)
            pass
    return loggers, run_dir


def _unpair_for_unpaired_losses(config) -> None:
    """KTO trains on unpaired rows: paired data is split (``data.unpair``) unless the data is unpaired already."""
    from dpo_lightning.losses import SPECS

    loss = config.model.loss
    names = [loss] if isinstance(loss, str) else list(loss)
    if not names or not all(name in SPECS and SPECS[name].unpaired for name in names):
        return
    if "unpair" in config.data and config.data.format != "unpaired" and not config.data.unpair:
        config.data.unpair = True


def tokenizer_from_policy(config) -> None:
    """A model directory brings its tokenizer: ``data.tokenizer`` unset and ``model.policy`` a local directory with
    tokenizer files (an SFT export, a downloaded checkpoint) -> that tokenizer, not a new BPE the model cannot read;
    a directory without them -> a warning (the BPE is trained, as asked, but not silently)."""
    policy = config.model.get("policy")
    if config.data.get("tokenizer") is not None or not policy:
        return
    if Path(policy, "tokenizer_config.json").is_file():
        config.data.tokenizer = str(policy)
    elif Path(policy).is_dir():  # said, not silent: a pretrained model cannot read a BPE trained here
        from lightning.pytorch.utilities import rank_zero_warn

        rank_zero_warn(
            f"model.policy {policy} holds no tokenizer and data.tokenizer is unset: a new BPE is trained on the "
            "data, with ids the model never saw; set data.tokenizer to the model's own tokenizer"
        )


class RunCLIMixin:
    """What every trainer command (``fit``/``validate``/``test``, ``sft``, ``ppo``) adds to LightningCLI: the
    ``run.*`` keys, the data's tokenizer handed to the model (and taken from a model directory, see
    :func:`tokenizer_from_policy`), and the run folder with its loggers. Mixed in before ``LightningCLI``; a command
    names its runs with :meth:`run_identity`."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_class_arguments(RunConfig, "run")
        parser.link_arguments("data.tokenizer", "model.tokenizer", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        tokenizer_from_policy(self.config[self.subcommand] if self.subcommand else self.config)

    def run_identity(self, model) -> tuple[str, float | None]:
        """(name, β) of the instantiated ``model``: the default run name ``<name>-beta<β>`` and wandb's job type."""
        raise NotImplementedError

    def instantiate_trainer(self, **kwargs):
        config = self.config_init[self.subcommand]
        if config["trainer"].get("logger") in (None, True):
            settings = flat_config(self.config[self.subcommand].as_dict())
            root = config["trainer"].get("default_root_dir")  # honoured: the run folder goes under it
            identity = self.run_identity(config["model"])
            kwargs["logger"], _ = build_loggers(config["run"], *identity, settings, root=root)
        return super().instantiate_trainer(**kwargs)


def run_lightning_cli(cli_class, model_class, data_class, argv: list[str] | None) -> int:
    """Run ``cli_class`` (a :class:`RunCLIMixin` LightningCLI) over the two classes on ``argv``, as every trainer
    command does: optimizers from the module, the resolved config saved over an earlier one."""
    cli_class(model_class, data_class, args=argv, auto_configure_optimizers=False,
              save_config_kwargs={"overwrite": True})  # fmt: skip
    return 0


def _lightning_cli(argv: list[str] | None, sft: bool = False) -> int:
    """Run LightningCLI on ``argv`` (``None``: on sys.argv, as a console script does); ``sft``: the SFT stage
    (SFTModule and SFTDataModule, trained as ``fit`` trains)."""
    from lightning.pytorch.cli import LightningCLI

    if sft:  # `sft ARGS` is `fit ARGS` of the SFT module
        from dpo_lightning.sft import SFTDataModule, SFTModule

        class SFTCLI(RunCLIMixin, LightningCLI):
            def run_identity(self, model) -> tuple[str, float | None]:
                return "sft", None

        return run_lightning_cli(SFTCLI, SFTModule, SFTDataModule, ["fit", *(argv or [])])

    from dpo_lightning.data import PreferenceDataModule
    from dpo_lightning.module import PreferenceModule

    class PreferenceCLI(RunCLIMixin, LightningCLI):
        def before_instantiate_classes(self) -> None:
            super().before_instantiate_classes()
            config = self.config[self.subcommand] if self.subcommand else self.config
            if config.model.label_smoothing == "label_noise":  # cDPO's ε follows the data's flip rate
                config.model.label_smoothing = config.data.label_noise
            _unpair_for_unpaired_losses(config)

        def run_identity(self, model) -> tuple[str, float | None]:
            return model.loss_name, model.beta

    return run_lightning_cli(PreferenceCLI, PreferenceModule, PreferenceDataModule, argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point: dispatch to an extra command or to LightningCLI; user mistakes print one clear message."""
    from dpo_lightning.errors import UserError

    words = list(sys.argv[1:] if argv is None else argv)
    configure_wandb_mode()
    try:
        if words and words[0] in EXTRA_COMMANDS:
            return int(importlib.import_module(EXTRA_COMMANDS[words[0]]).main(words[1:]) or 0)
        if words and words[0] == "sft":
            return _lightning_cli(words[1:], sft=True)
        return _lightning_cli(argv)
    except UserError as err:
        print(f"dpo-lightning: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dpo-lightning: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
