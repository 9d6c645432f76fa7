"""Evaluation: retrieval and captioning metrics, CapFilt quality, the report."""
