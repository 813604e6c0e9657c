"""Evaluation CLIs: perplexity, generation, throughput."""
