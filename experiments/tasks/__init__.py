"""One LightningModule + LightningDataModule per experiment (configs/experiment/*.yaml)."""
