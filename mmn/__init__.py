"""Shared core of the MMN CVR pipeline: config, feature hashing, domain vocabulary, CLI."""
