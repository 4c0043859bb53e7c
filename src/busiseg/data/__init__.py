"""Data: scanning the BUSI layout, the synthetic phantom, splits, datasets and the datamodule."""
