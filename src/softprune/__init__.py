"""softprune: soft-to-hard filter pruning for PyTorch CNNs, with exact compaction to a smaller model."""

__version__ = "0.1.0"
