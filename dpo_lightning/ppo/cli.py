"""``dpo-lightning ppo``: PPO training from a LightningCLI config.

    dpo-lightning ppo --config experiments/tiny_ppo.yaml [--model.kl_coef 0.1] [--ckpt_path last]
    dpo-lightning ppo --help                                   # every model.*, data.*, trainer.* and run.* key

It is ``fit`` of a LightningCLI over :class:`~dpo_lightning.ppo.module.PPOModule` and
:class:`~dpo_lightning.ppo.data.PromptDataModule`: a wrong key fails before anything runs, the resolved config is
saved in the run folder, and the run folder and loggers (``run.*``) are those of ``dpo-lightning fit``.
``data.updates_per_rollout`` is set from ``model.ppo_epochs × model.num_minibatches``, the data's tokenizer is
handed to the model, and ``data.tokenizer`` defaults to ``model.policy`` when that directory holds a tokenizer.
"""

from __future__ import annotations

from dpo_lightning.cli import RunCLIMixin, run_lightning_cli


def main(argv: list[str]) -> int:
    """Run PPO (``fit``) on ``argv``; returns the exit status."""
    from lightning.pytorch.cli import LightningCLI

    from dpo_lightning.ppo.data import PromptDataModule
    from dpo_lightning.ppo.module import PPOModule

    class PPOCLI(RunCLIMixin, LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            super().add_arguments_to_parser(parser)
            parser.link_arguments(("model.ppo_epochs", "model.num_minibatches"), "data.updates_per_rollout",
                                  compute_fn=lambda epochs, parts: epochs * parts)  # fmt: skip

        def run_identity(self, model) -> tuple[str, float | None]:
            return "ppo", model.hparams.kl_coef

    args = list(argv)
    if args[:1] != ["fit"]:  # PPO only trains: `ppo ARGS` is `fit ARGS`
        args = ["fit", *args]
    return run_lightning_cli(PPOCLI, PPOModule, PromptDataModule, args)
