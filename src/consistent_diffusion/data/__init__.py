"""Datasets the product builds for itself (the embedded model's emoji data)."""
