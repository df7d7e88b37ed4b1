"""Offline serving on top of the model: the continuous-batching engine and the LM head (greedy sampling)."""
