"""The containers the operator runs (the trainer, the one vLLM container), built from plain values."""
