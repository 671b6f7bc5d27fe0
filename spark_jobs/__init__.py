"""Batch jobs of the pipeline: the raw-log generator and the Spark hash-and-join build."""
