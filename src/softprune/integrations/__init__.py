"""Bridges to training frameworks (each an optional dependency): ``softprune.integrations.lightning``."""
