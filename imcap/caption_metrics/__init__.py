"""The caption metrics as an `evaluate` module (see caption_metrics.py); load it by path."""
