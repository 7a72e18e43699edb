"""Tiny random configs of the architectures kvbench is checked on (tests/test_model_matrix.py): hidden 64, 4 layers,
4 query / 2 KV heads, head dim 16, sliding windows of 32 (and an attention chunk of 16) so prompts of ~100 tokens
cross them; each architecture's own layer mix (sliding / global, linear attention, SSM, conv) as its config builds
it. A config that transformers cannot build is skipped with its reason."""

from __future__ import annotations

from typing import Any

BASE: dict[str, Any] = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=1024,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)
WINDOW = 32
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
MAMBA2 = dict(
    mamba_n_heads=4,
    mamba_d_head=32,
    mamba_d_state=16,
    mamba_n_groups=1,
    mamba_d_conv=4,
    mamba_expand=2,
    mamba_chunk_size=16,
)

# architecture -> config overrides on BASE (None: drop the BASE key)
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "llama": {},
    "qwen3": {},
    "qwen3_moe": dict(**MOE),
    "olmo2": {},
    "granite": {},
    "glm4": {},
    "smollm3": dict(no_rope_layer_interval=2),
    "mistral": dict(sliding_window=WINDOW),
    "ministral": dict(sliding_window=WINDOW),
    "qwen2": dict(sliding_window=WINDOW, use_sliding_window=True, max_window_layers=2),
    "phi3": dict(sliding_window=WINDOW),
    "gemma2": dict(sliding_window=WINDOW),
    "gemma3_text": dict(sliding_window=WINDOW, sliding_window_pattern=2),
    "cohere2": dict(sliding_window=WINDOW),
    "olmo3": dict(sliding_window=WINDOW),
    "gpt_oss": dict(sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2),
    "llama4_text": dict(
        attention_chunk_size=16, num_local_experts=2, interleave_moe_layer_step=2, intermediate_size_mlp=128
    ),
    "gpt_neox": dict(num_key_value_heads=None, head_dim=None, rotary_pct=0.5),
    "phi": dict(num_key_value_heads=None, head_dim=None, partial_rotary_factor=0.5),
    "deepseek_v3": dict(
        num_key_value_heads=4,
        head_dim=8,
        q_lora_rank=32,
        kv_lora_rank=24,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
    ),
    "qwen3_next": dict(
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        full_attention_interval=2,
        shared_expert_intermediate_size=32,
        **MOE,
    ),
    "falcon_h1": dict(
        mamba_d_ssm=64,
        mamba_n_heads=4,
        mamba_d_head=16,
        mamba_d_state=16,
        mamba_n_groups=1,
        mamba_d_conv=4,
        mamba_chunk_size=16,
    ),
    "lfm2": dict(layer_types=["conv", "full_attention", "conv", "full_attention"]),
    "gemma4_text": dict(sliding_window=WINDOW),
    "jamba": dict(
        num_experts=2,
        num_experts_per_tok=1,
        expert_layer_period=2,
        expert_layer_offset=1,
        attn_layer_period=2,
        attn_layer_offset=1,
        mamba_d_state=8,
        mamba_d_conv=4,
        mamba_expand=2,
        mamba_dt_rank=8,
    ),
    "bamba": dict(attn_layer_indices=[1, 3], **MAMBA2),
    "granitemoehybrid": dict(
        layer_types=["mamba", "attention", "mamba", "attention"], num_local_experts=2, num_experts_per_tok=1, **MAMBA2
    ),
    "nemotron_h": dict(
        hybrid_override_pattern="M*M*",
        mamba_num_heads=4,
        mamba_head_dim=32,
        ssm_state_size=16,
        n_groups=1,
        conv_kernel=4,
        expand=2,
        chunk_size=16,
    ),
}


def config_kwargs(arch: str, vocab_size: int | None = None) -> dict[str, Any]:
    """`AutoConfig.for_model(arch, **config_kwargs(arch))`: BASE with the architecture's overrides."""
    merged = {**BASE, **ARCHITECTURES[arch]}
    if vocab_size is not None:
        merged["vocab_size"] = vocab_size
    return {key: value for key, value in merged.items() if value is not None}
