"""Argument groups shared by commands: model loading, method stacks, fine-tuned methods."""
