"""The ground floor: config, the samples' contract, paths, hashing, vocabularies, schedule.

Every other package may import from here; nothing here imports from any other package of
the project (checked by the import contract in pyproject.toml).
"""
