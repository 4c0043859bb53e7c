"""busiseg: one network that classifies a breast ultrasound image and segments its lesion."""

import os

# albumentations checks PyPI for updates on import; busiseg never touches the network.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
