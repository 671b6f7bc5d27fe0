"""Serving and registry: the promotion gate, MLflow aliases, the pyfunc model, plots."""
