"""Checkpoint helpers: orbax utilities and HF transformers Switch import/export."""
