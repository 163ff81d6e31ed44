"""Benchmarks run by hand (``cbtstream bench ...``); never imported by the pipeline."""
