"""The quality stages between validated records and rendering (docs/data_quality.md).

texts.py     QualityText (what a stage looks at) and Removal (why a record went), text normalisation, shingles
filters.py   rule-based filters (length, refusals, Alpaca heuristics, language, repetition, code fences, empty)
score.py     AlpaGasus-style model scores through an OpenAI-compatible judge
dedup.py     exact and MinHash-LSH near-duplicate removal
decontam.py  evaluation-set contamination (n-gram overlap or MinHash)
balance.py   caps and weights per group
stage.py     runs the configured stages over scanned sources: kept indices and every removal with its reason
"""
