"""Curation of raw training text before `phi-jax data prepare`: near-duplicate removal (dedup.py),
decontamination against the evaluation benchmarks (decontaminate.py) and quality filtering (filter.py,
classifier.py). Every command reads and writes corpora through records.py."""
