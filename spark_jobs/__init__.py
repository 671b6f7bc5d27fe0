"""The Spark hash-and-join build job: entry point ``build_samples.py``, its steps beside it."""
