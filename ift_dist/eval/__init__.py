"""Evaluation of a causal LM (docs/eval.md): multiple-choice benchmarks (MMLU, C-Eval, CMMLU), held-out perplexity,
answers to held-out prompts, IFEval and an LLM judge.

records.py       the typed records the stages pass: Question, Subject, McPrompt, Prediction
benchmarks.py    a benchmark's CSV files -> Questions (three layouts; bad rows named by file and line)
prompts.py       Question + few-shot examples -> McPrompt (lm-eval's plain text, or the model's chat template)
scoring.py       McPrompts -> log-likelihood of every continuation (batched, lm-eval's tokenisation)
mc.py            a benchmark on every rank: shard, score, gather, summarise, write, print
ppl.py           held-out perplexity with the trainer's rendering and token accounting
in_training.py   eval.benchmarks scored on the training ranks under ZeRO-3
model_source.py  MODEL_OR_RUN -> a Hugging Face directory (a checkpoint is exported on the fly)
prompt_sets.py   held-out prompt sets (MT-bench, Vicuna, Self-Instruct, ...) and user files -> EvalPrompts
generate.py      EvalPrompts -> answers on every rank (left-padded batches, seeded batch-independent sampling)
answers_file.py  answers.jsonl: where it is, read, append (torch-free)
answers_html.py  answers as one HTML page
ifeval.py        IFEval: lm-eval's instruction checkers on the answers
judge_prompts.py MT-bench's judge prompts and reading verdicts back
judge_client.py  calls to an OpenAI-compatible judge: retries, concurrency, disk cache, counters
judge.py         `ift eval judge`: single grades and pairwise verdicts, scores, table, chart
cli.py           `ift eval mc|ppl|generate|ifeval|judge` and `python -m ift_dist.eval` (what deepspeed --module runs)
cli_generate.py  the generate and ifeval subcommands
"""
