"""Random-weight SDXL-shaped model families and tiny data sets, for tests and benchmarks (not imported at run time)."""
