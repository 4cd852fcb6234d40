"""Drop-in helpers for other MLLM code bases."""
