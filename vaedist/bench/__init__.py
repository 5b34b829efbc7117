"""Benchmarks that print ratios against a baseline measured in the same run (machines are noisy).

One module per benchmark; each is a `vaedist bench <name>` command.
"""
