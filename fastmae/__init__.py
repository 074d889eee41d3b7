"""fastmae: Masked Autoencoder pretraining, computed exactly as the original MAE, faster."""

__version__ = "0.1.0"
