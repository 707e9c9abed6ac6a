"""Trainer and evaluator that run inside the trainer image (see ../CONTRACT.md)."""

__version__ = "0.1.0"
