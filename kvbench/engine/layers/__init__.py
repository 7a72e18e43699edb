"""Cache layers with storage of their own that methods build on (beside `kvbench.engine.cache.KVLayer` and the
quantised layers of `kvbench.engine.quant`); each method module keeps only its policy.

* `channel_pruned`: `ChannelPrunedLayer`, keys holding only each head's kept channels (ThinK);
* `checkpoint`: `CheckpointLayer`, a recent window of K/V with every older token recomputed on demand from
  checkpoints (residual-stream inputs or token ids), and the recomputation it needs (KV-Direct);
* `distilled`: writing corrected values and a per-slot logit bias into a plain layer's kept slots (kv_distill);
* `mixed_precision`: `MiKVLayer`, kept slots in the cache dtype and demoted slots in low-bit packed stores (MiKV).
"""
