"""Benchmarks (``make bench``): measurements, never assertions. Results land in bench/results/."""
