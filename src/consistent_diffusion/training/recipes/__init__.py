"""Recipes for the embedded model: its base stages, metric heads and probes."""
