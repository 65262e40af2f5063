"""rayskd: Ray-based on-policy distillation."""
__version__ = "0.1.0"
