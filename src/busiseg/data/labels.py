"""Class labels, fixed for every dataset busiseg reads."""

# Index = label id. The BUSI folder names are the class names.
CLASS_NAMES: tuple[str, ...] = ("normal", "benign", "malignant")
NUM_CLASSES = len(CLASS_NAMES)
LABEL_OF: dict[str, int] = {name: i for i, name in enumerate(CLASS_NAMES)}
