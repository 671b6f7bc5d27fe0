"""Log simulation: the raw-log generator and synthetic samples for tests and benchmarks."""
