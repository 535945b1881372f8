"""Benchmarks (`make bench`): throughput at the rate limit against a served sandbox, and peers."""
