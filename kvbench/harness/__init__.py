"""The harness: plan, run and store evaluation rows on top of the engine and the methods.

* `runner`: one sample through every (method, budget) job (prefill once, copy, compress, decode, score) and
  the public pieces scenarios and the lm-eval adapter build on (`shared_prefill`, `compress_copy`, `run_job`,
  `build_row`);
* `options`: `RunOptions`, the one settings object that travels from the CLI / API down to scenarios;
* `chunked`: chunked prefill with compression between chunks;
* `budget`: budgets (entries or kept fractions) resolved per prompt;
* `fidelity`: token match, first divergence and KL against the full cache;
* `results`: the append-only results store (resume, claims, summaries' input), `jsonl`: robust JSONL;
* `sample`, `prompt`: what a sample is and how its prompt is tokenised;
* `metrics`: the metric registry (tasks register theirs; the runner scores with it).
"""
