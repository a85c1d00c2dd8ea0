"""Test support shared by the test suite and the benchmarks (a real TorchServe in a sandbox)."""
