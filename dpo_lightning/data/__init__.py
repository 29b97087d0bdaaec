"""Preference data: formats, tokenization, the DataModule."""

from dpo_lightning.data.datamodule import PreferenceDataModule

__all__ = ["PreferenceDataModule"]
