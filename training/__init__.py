"""Training side of the MMN CVR pipeline: layers, models, losses, data, metrics, trainer."""
