"""Training recipes: the embedded base model (``base``), and fine-tuning methods."""
