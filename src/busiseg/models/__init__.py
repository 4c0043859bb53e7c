"""Models: the multi-task U-Net, its losses, metrics, the LightningModule and callbacks."""
