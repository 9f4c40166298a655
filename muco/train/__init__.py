"""Training: the LightningModule, optimisation, sharding and training callbacks."""
