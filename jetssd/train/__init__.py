"""Training of PFJet-SSD (extra ``train``): data pipeline, loss, trainer, configuration."""
