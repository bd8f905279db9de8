"""Evaluation of a causal LM: multiple-choice benchmarks (MMLU, C-Eval, CMMLU) and held-out perplexity (docs/eval.md).

records.py     the typed records the stages pass: Question, Subject, McPrompt, Prediction
benchmarks.py  a benchmark's CSV files -> Questions (three layouts; bad rows named by file and line)
prompts.py     Question + few-shot examples -> McPrompt (lm-eval's plain text, or the model's chat template)
scoring.py     McPrompts -> log-likelihood of every continuation (batched, lm-eval's tokenisation)
mc.py          a benchmark on every rank: shard, score, gather, summarise, write, print
ppl.py         held-out perplexity with the trainer's rendering and token accounting
model_source.py  MODEL_OR_RUN -> a Hugging Face directory (a checkpoint is exported on the fly)
cli.py         `ift eval mc|ppl` and `python -m ift_dist.eval` (what deepspeed --module runs)
"""
