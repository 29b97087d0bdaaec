"""dpo_lightning: Direct Preference Optimization on PyTorch Lightning."""

__version__ = "0.1.0"
