"""Benchmarks and comparisons run through the trainer's own code (lm.engine): throughput and memory,
the quality race, the GPU smoke run. The CLIs in evals/ parse arguments and call these."""
