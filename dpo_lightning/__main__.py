"""``python -m dpo_lightning ...`` is the same command as ``dpo-lightning ...``."""

import sys

from dpo_lightning.cli import main

sys.exit(main())
