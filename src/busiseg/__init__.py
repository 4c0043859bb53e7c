"""busiseg: one network that classifies a breast ultrasound image and segments its lesion."""

import os

# albumentations checks PyPI for updates on import; busiseg never touches the network.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"

# conf/hydra/launcher/submitit_slurm.yaml deliberately shadows hydra-submitit-launcher's config of
# the same name (its resources come from the trainer config); Hydra then validates it against
# the plugin's schema, as wanted, and warns that such matching is deprecated. Silence only that.
import warnings as _warnings

_warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/submitit_slurm' is validated against ConfigStore schema")

# MultiTaskModule.on_after_batch_transfer is where device-side augmentation and mixing happen
# (busiseg.data.device_augment, busiseg.data.mixing): by design, not the datamodule's. Lightning
# warns on every fit that the module's hook is the one used; that is the intent, so only that is silenced.
_warnings.filterwarnings("ignore", message=r"You have overridden `on_after_batch_transfer` in `LightningModule` but")

# Lightning 2.6 with torch 2.14: its own pytree helper trips torch's deprecation of LeafSpec on every fit
# (twice); nothing a busiseg user can act on.
_warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")

import logging as _logging


class _NoAdvert(_logging.Filter):
    """Drop Lightning's "💡 Tip: ... try installing litlogger" line, printed on every run without its cloud logger."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return "litlogger" not in str(record.msg)


for _name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
    _logging.getLogger(_name).addFilter(_NoAdvert())
