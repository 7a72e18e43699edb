"""The engine: what runs a model over a compressible KV cache, with no notion of methods, tasks or runs.

* `cache`: `KVCache` and its layers (`KVLayer`: slots with original positions, per-head lengths, physical
  shrinkage), byte accounting;
* `attention`: the `kvbench` attention function transformers calls for every layer (prefill, chunks, decode);
* `generation`: prefill, forwards over a cache, greedy decoding, query recorders;
* `rope`: rotary embeddings (re-rotation, un-rotation) read from the model;
* `models`: model + tokenizer loading (the embedded GGUF, any transformers causal LM, tiny random configs);
* `hub`: the Hugging Face hub when it answers, package data paths, the per-model cache directory;
* `measure`: stopwatch phases and peak memory;
* `kernels/`: Triton kernels with their torch references (window scores, decode attention, packed decode);
* `quant/`: quantised storage (packed codes, segments, codecs, quantised cache layers);
* `layers/`: cache layers with storage of their own that methods build on (mixed precision, checkpoints,
  distilled slots).

Imports only go downward: the engine imports nothing of `kvbench.methods`, `harness`, `scenarios`, `tasks`,
`report` or the top-level modules (`tests/test_layering.py`).
"""
