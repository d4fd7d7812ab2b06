"""Benchmark scripts: training cost and LLM quality, side by side with peft (docs/benchmarks/)."""
