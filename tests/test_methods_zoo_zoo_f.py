"""cam, minicache and quest: golden cases on hand-made tensors from the papers' formulas, the mass CaM's merge
preserves, MiniCache's shared storage, retention band and exact bytes, Quest's page bounds, exactly k pages read,
decode logits equal to a plain reference and the full cache when every page fits; bad hyperparameters refused in
one line."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AttentionInterface, DynamicCache

from kvbench.engine.architecture import cache_argument
from kvbench.engine.attention import attend
from kvbench.engine.cache import KVCache, KVLayer
from kvbench.engine.generation import forward_tokens, prefill
from kvbench.engine.layers.depth_merged import DepthMergedLayer, MergedPair, retained_tokens, slerp_directions
from kvbench.engine.layers.paged import PagedLayer, page_bounds, page_upper_bounds
from kvbench.engine.measure import Stopwatch
from kvbench.methods import build_method
from kvbench.methods.base import CompressionContext
from kvbench.methods.cam import cam_evict
from kvbench.methods.minicache import merged_pairs


def plain_layer(keys: torch.Tensor, values: torch.Tensor) -> KVLayer:
    """A layer holding `[Hkv, L, d]` keys/values at positions 0..L-1."""
    layer = KVLayer()
    positions = torch.arange(keys.shape[1])
    layer.update(keys[None], values[None], positions=positions)
    return layer


# ---------------------------------------------------------------- cam


def test_cam_golden_merge_on_hand_made_tensors():
    """L=6, budget 3, one start slot (start_ratio 0.34), merge_budget 2, merge=expected: slots 1, 2, 3 are evicted in
    order; p_j = A_j / mean(A_0, A_4, A_5); slot j adds p_j v_j / 2 to slots j+1 and j+2."""
    values = torch.tensor([[[1.0], [2.0], [4.0], [8.0], [16.0], [32.0]]])  # one head, d=1
    keys = torch.arange(6.0).view(1, 6, 1)
    scores = torch.tensor([[0.3, 0.2, 0.1, 0.6, 0.1, 0.2]])  # mean over kept (0.3, 0.1, 0.2) = 0.2
    layer = plain_layer(keys, values)
    record: dict = {}
    cam_evict(layer, scores, 3, 0.34, 2, "expected", None, record)
    p1, p2, p3 = 1.0, 0.5, 1.0  # 0.2 / 0.2, 0.1 / 0.2, min(0.6 / 0.2, 1)
    v = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]
    v[2] += p1 * v[1] / 2
    v[3] += p1 * v[1] / 2
    v[3] += p2 * v[2] / 2
    v[4] += p2 * v[2] / 2
    v[4] += p3 * v[3] / 2
    v[5] += p3 * v[3] / 2
    assert layer.positions.tolist() == [[0, 4, 5]]
    assert torch.allclose(layer.values[0, 0, :, 0], torch.tensor([v[0], v[4], v[5]]))
    assert torch.equal(layer.keys[0, 0, :, 0], torch.tensor([0.0, 4.0, 5.0]))  # keys unchanged
    assert record == {"cam_evictions": 3, "cam_merged_weight": 2.5}


@pytest.mark.parametrize("merge", ["bernoulli", "expected"])
def test_cam_preserves_the_value_mass_when_every_evicted_slot_merges(merge):
    """Uniform attention: p = 1 for every evicted slot, so each one's value (with what it received) reaches the kept
    slots whole: per head, the kept values sum to the sum of ALL values."""
    generator = torch.Generator().manual_seed(0)
    keys, values = torch.randn(2, 50, 4, generator=generator), torch.randn(2, 50, 4, generator=generator)
    layer = plain_layer(keys, values)
    cam_evict(layer, torch.full((2, 50), 0.02), 12, 0.25, 5, merge, torch.Generator().manual_seed(1), {})
    assert layer.get_seq_length() == 12
    assert layer.positions[0].tolist() == [0, 1, 2, *range(41, 50)]
    assert torch.allclose(layer.values[0].sum(dim=1), values.sum(dim=1), atol=1e-5)


def test_cam_mass_grows_by_the_merged_values_only():
    """With a zero score the slot is dropped, not merged: the kept sum is the kept originals plus the merged ones."""
    values = torch.tensor([[[1.0], [10.0], [100.0], [1000.0], [5.0]]])
    scores = torch.tensor([[1.0, 0.0, 1.0, 1.0, 1.0]])  # slot 1 never merges; slot 2 merges (p = 1)
    layer = plain_layer(torch.zeros(1, 5, 1), values)
    cam_evict(layer, scores, 2, 0.5, 4, "bernoulli", torch.Generator().manual_seed(0), {})
    # kept: slot 0 and slot 4; slot 2 -> slots 3, 4 (50 each); slot 3 (1000 + 50) -> slot 4
    assert layer.values[0, 0, :, 0].tolist() == [1.0, 5.0 + 50.0 + 1050.0]


def test_cam_keeps_its_budget_while_decoding_on_the_tiny_model(tiny_lm):
    tokens = list(range(5, 45))
    pre = prefill(tiny_lm, tokens, 8, Stopwatch(tiny_lm.device), [])
    cache = pre.cache.copy()
    method = build_method({"name": "cam", "window": 8})
    ctx = CompressionContext.for_prompt(tiny_lm, 16, len(tokens), pre)
    method.setup(cache, ctx)
    method.compress(cache, ctx)
    assert [layer.get_seq_length() for layer in cache.layers] == [16] * len(cache.layers)
    for step in range(3):
        forward_tokens(tiny_lm, cache, [50 + step])
        assert [layer.get_seq_length() for layer in cache.layers] == [16] * len(cache.layers)
        assert cache.layers[0].positions[0, -1].item() == len(tokens) + step  # the newest slot is kept
    assert ctx.record["cam_evictions"] == (24 + 3) * tiny_lm.num_kv_heads * len(cache.layers)


@pytest.mark.parametrize(
    "params, message",
    [
        ({"start_ratio": 1.0}, r"^cam start_ratio must be in \[0, 1\), got 1.0$"),
        ({"merge_budget": 0}, r"^cam merge_budget must be an int >= 1, got 0$"),
        ({"window": 0}, r"^cam window must be an int >= 1, got 0$"),
        ({"merge": "max"}, r"^unknown cam merge 'max'\. Valid merges: bernoulli, expected\.$"),
    ],
)
def test_cam_refuses_bad_hyperparameters_in_one_line(params, message):
    with pytest.raises(ValueError, match=message):
        build_method({"name": "cam", **params})


# ---------------------------------------------------------------- quest


def test_quest_page_bounds_and_upper_bound_golden():
    keys = torch.tensor([[[1.0, -2.0], [3.0, 0.0], [-1.0, 5.0], [2.0, 2.0], [0.0, -4.0]]])  # 1 head, L=5, d=2
    low, high = page_bounds(keys, 2)
    assert low.tolist() == [[[1.0, -2.0], [-1.0, 2.0], [0.0, -4.0]]]
    assert high.tolist() == [[[3.0, 0.0], [2.0, 5.0], [0.0, -4.0]]]
    query = torch.tensor([[1.0, -1.0]])  # one query head
    bound = page_upper_bounds(query, low, high)
    # sum_i max(q_i m_i, q_i M_i): page 0: 3 + 2; page 1: 2 + (-2); page 2: 0 + 4
    assert bound.tolist() == [[5.0, 0.0, 4.0]]


def test_quest_bound_is_an_upper_bound_and_groups_take_the_max():
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 37, 8, generator=generator)
    query = torch.randn(4, 8, generator=generator)  # 2 query heads per KV head
    low, high = page_bounds(keys, 4)
    bound = page_upper_bounds(query, low, high)
    for kv_head in range(2):
        for page in range(10):
            block = keys[kv_head, page * 4 : page * 4 + 4]
            group = query[2 * kv_head : 2 * kv_head + 2]
            logits = group @ block.T
            assert float(bound[kv_head, page]) >= float(logits.max()) - 1e-5
            per_head = [float(torch.maximum(q * block.amin(0), q * block.amax(0)).sum()) for q in group]
            assert math.isclose(float(bound[kv_head, page]), max(per_head), rel_tol=1e-5, abs_tol=1e-5)


def paged(keys: torch.Tensor, values: torch.Tensor, page_size: int, pages_read: int | None) -> PagedLayer:
    return PagedLayer.from_layer(plain_layer(keys, values), page_size, pages_read)


def test_quest_reads_exactly_k_pages_and_attends_over_them():
    generator = torch.Generator().manual_seed(1)
    heads, kv_heads, length, dim, page = 4, 2, 37, 8, 4
    keys, values = torch.randn(kv_heads, length, dim, generator=generator), torch.randn(kv_heads, length, dim)
    query = torch.randn(1, heads, 1, dim, generator=generator)
    reads = []
    layer = paged(keys, values, page, 3)
    layer.tally = lambda read, held: reads.append((read, held))
    key, value, mask = layer.read_subset(query, layer.keys, layer.values, None)
    assert key.shape == (1, kv_heads, 3 * page, dim) and value.shape == key.shape
    # reference selection: the 3 pages of highest bound per KV head, by brute force
    expected_slots = []
    for kv_head in range(kv_heads):
        group = query[0, 2 * kv_head : 2 * kv_head + 2, 0]
        scores = []
        for p in range(math.ceil(length / page)):
            block = keys[kv_head, p * page : (p + 1) * page]
            scores.append(max(float(torch.maximum(q * block.amin(0), q * block.amax(0)).sum()) for q in group))
        top = sorted(sorted(range(len(scores)), key=lambda p: -scores[p])[:3])
        slots = [s for p in top for s in range(p * page, min((p + 1) * page, length))]
        expected_slots.append(slots)
        n = len(slots)
        assert torch.equal(key[0, kv_head, :n], keys[kv_head, slots])
        assert int(mask[0, kv_head, 0].sum()) == n
    # attention over the selection = softmax over exactly those slots
    out = attend(query, key, value, mask, False, 0.5)
    for h in range(heads):
        slots = expected_slots[h // 2]
        probs = ((query[0, h, 0] @ keys[h // 2, slots].T) * 0.5).softmax(-1)
        assert torch.allclose(out[0, h, 0], probs @ values[h // 2, slots], atol=1e-5)
    slot_bytes = 2 * dim * 4
    bounds = 2 * kv_heads * 10 * dim * 4
    read = sum(len(s) for s in expected_slots) * slot_bytes + bounds
    assert reads == [(read, kv_heads * length * slot_bytes + bounds)]
    assert layer.nbytes() == kv_heads * length * slot_bytes + bounds


def test_quest_with_every_page_selected_is_the_full_cache():
    keys, values = torch.randn(2, 37, 8), torch.randn(2, 37, 8)
    query = torch.randn(1, 4, 1, 8)
    layer = paged(keys, values, 4, 10)  # 10 pages: all of them
    key, value, mask = layer.read_subset(query, layer.keys, layer.values, None)
    assert torch.equal(key, layer.keys) and torch.equal(value, layer.values) and mask is None


def test_quest_bounds_follow_appends():
    keys = torch.randn(1, 6, 4)
    layer = paged(keys, torch.randn(1, 6, 4), 4, 1)
    new = torch.randn(1, 1, 3, 4)
    layer.update(new, new, positions=torch.arange(6, 9))
    low, high = page_bounds(torch.cat([keys, new[0]], dim=1), 4)
    assert torch.equal(layer.low, low) and torch.equal(layer.high, high)


def test_quest_on_the_tiny_model_reads_k_pages_per_sparse_layer(tiny_lm):
    tokens = list(range(5, 75))  # 70 tokens: 5 pages of 16
    pre = prefill(tiny_lm, tokens, 0, Stopwatch(tiny_lm.device), [])
    cache = pre.cache.copy()
    method = build_method({"name": "quest", "dense_layers": 1})
    ctx = CompressionContext.for_prompt(tiny_lm, 32, len(tokens), pre)
    method.setup(cache, ctx)
    method.after_compress(cache, ctx)
    assert ctx.record["memory_freed"] is False and ctx.record["quest_pages_read"] == 2
    forward_tokens(tiny_lm, cache, [80])
    layers, kv_heads, head_dim = len(cache.layers), tiny_lm.num_kv_heads, tiny_lm.config.head_dim
    element = torch.empty((), dtype=tiny_lm.dtype).element_size()
    slot = 2 * head_dim * element
    bounds = 2 * kv_heads * 5 * head_dim * element
    dense = kv_heads * 71 * slot + bounds
    # sparse layers read 2 full pages per head unless the partial last page (7 slots) is among them
    assert ctx.record["quest_decode_steps"] == 1
    read = ctx.record["quest_bytes_read_per_step"]
    assert dense + (layers - 1) * (kv_heads * (7 + 16) * slot + bounds) <= read
    assert read <= dense + (layers - 1) * (kv_heads * 32 * slot + bounds)
    assert ctx.record["quest_bytes_held_per_step"] == layers * dense == cache.kv_bytes()


def quest_reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Quest written out plainly over a DynamicCache's full K/V: dense causal attention, except that a one-token
    query of a layer >= QUEST_REFERENCE["dense_layers"] sees only the top-k pages of each KV head, k pages scored by
    the max over the head's query group of sum_i max(q_i min_i, q_i max_i) over the page's keys."""
    page, k = QUEST_REFERENCE["page_size"], QUEST_REFERENCE["pages"]
    heads, kv_heads, length = query.shape[1], key.shape[1], key.shape[2]
    group = heads // kv_heads
    keys, vals = key[0].float().repeat_interleave(group, 0), value[0].float().repeat_interleave(group, 0)
    scores = torch.einsum("hqd,hkd->hqk", query[0].float(), keys) * (scaling or query.shape[-1] ** -0.5)
    visible = torch.arange(length)[None] <= torch.arange(length - query.shape[2], length)[:, None]
    pages = math.ceil(length / page)
    if query.shape[2] == 1 and module.layer_idx >= QUEST_REFERENCE["dense_layers"] and k < pages:
        bounds = torch.zeros(kv_heads, pages)
        for kv_head in range(kv_heads):
            for p in range(pages):
                block = key[0, kv_head, p * page : (p + 1) * page].float()
                group_queries = query[0, kv_head * group : (kv_head + 1) * group, 0].float()
                per_query = torch.maximum(group_queries * block.amin(0), group_queries * block.amax(0)).sum(-1)
                bounds[kv_head, p] = per_query.max()
        chosen = torch.zeros(kv_heads, pages, dtype=torch.bool)
        chosen.scatter_(1, bounds.topk(k, dim=-1).indices, True)
        read = chosen.repeat_interleave(page, 1)[:, :length].repeat_interleave(group, 0)  # [H, L]
        visible = visible[None] & read[:, None, :]
    out = scores.masked_fill(~visible, float("-inf")).softmax(-1) @ vals
    return out.to(query.dtype)[None].transpose(1, 2).contiguous(), None


QUEST_REFERENCE = {"page_size": 16, "pages": 2, "dense_layers": 1}
AttentionInterface.register("kvbench_test_quest_reference", quest_reference_attention)


def test_quest_decode_matches_a_plain_reference_on_the_tiny_model(tiny_lm):
    """The whole path (budget -> pages read, dense layers, GQA groups, the current token's partial page, the mask
    over the gathered slots) against Quest written out over HF's DynamicCache, teacher-forced on the same tokens."""
    tokens = list(range(5, 75))  # 70 tokens: 4 full pages and a partial one
    pre = prefill(tiny_lm, tokens, 0, Stopwatch(tiny_lm.device), [])
    cache, full = pre.cache.copy(), pre.cache.copy()
    method = build_method({"name": "quest", "dense_layers": 1})
    ctx = CompressionContext.for_prompt(tiny_lm, 32, len(tokens), pre)  # budget 32: 2 pages
    method.setup(cache, ctx)
    method.after_compress(cache, ctx)
    steps = [80, 81, 82, 83]
    quest = torch.stack([forward_tokens(tiny_lm, cache, [t]) for t in steps]).float()
    dense = torch.stack([forward_tokens(tiny_lm, full, [t]) for t in steps]).float()
    config = tiny_lm.model.config
    saved = config._attn_implementation
    config._attn_implementation = "kvbench_test_quest_reference"
    try:
        reference_cache = {cache_argument(type(tiny_lm.model)): DynamicCache()}
        with torch.no_grad():
            tiny_lm.model(input_ids=torch.tensor([tokens]), use_cache=True, **reference_cache)
            reference = torch.stack(
                [
                    tiny_lm.model(input_ids=torch.tensor([[t]]), use_cache=True, **reference_cache)
                    .logits[0, -1]
                    .float()
                    for t in steps
                ]
            )
    finally:
        config._attn_implementation = saved
    assert torch.allclose(quest, reference, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(quest, dense, atol=1e-3)  # the selection changes the logits: the check has teeth


@pytest.mark.parametrize(
    "params, message",
    [
        ({"page_size": 0}, r"^quest page_size must be an int >= 1, got 0$"),
        ({"dense_layers": -1}, r"^method.dense_layers must be >= 0, got -1$"),
    ],
)
def test_quest_refuses_bad_hyperparameters_in_one_line(params, message):
    with pytest.raises(ValueError, match=message):
        build_method({"name": "quest", **params})


# ---------------------------------------------------------------- minicache


def test_minicache_slerp_and_reconstruction_golden():
    a = torch.tensor([[[3.0, 0.0], [1.0, 1.0]]])  # one head, two tokens
    b = torch.tensor([[[0.0, 2.0], [2.0, 2.0]]])
    direction = slerp_directions(a, b, 0.6)
    # token 0: orthogonal unit vectors -> (cos(0.6 pi/2), sin(0.6 pi/2)); token 1: parallel -> the common direction
    assert torch.allclose(direction[0, 0], torch.tensor([math.cos(0.3 * math.pi), math.sin(0.3 * math.pi)]))
    assert torch.allclose(direction[0, 1], torch.tensor([1.0, 1.0]) / math.sqrt(2))
    pair = MergedPair.merge(a, b, 0.6, 0.0)  # gamma 0: nothing retained
    assert not pair.retained.any()
    assert torch.allclose(pair.read(0)[0, 0], 3.0 * direction[0, 0])
    assert torch.allclose(pair.read(1)[0, 0], 2.0 * direction[0, 0])
    assert torch.allclose(pair.read(0)[0, 1], a[0, 1]) and torch.allclose(pair.read(1)[0, 1], b[0, 1])


def test_minicache_retention_rule_golden():
    distance = torch.tensor([[0.1, 0.5, 0.2, 0.9], [0.3, 0.3, 0.3, 0.3]])
    # head 0: retained above 0.9 - 0.5 * 0.8 = 0.5 (strictly); head 1: all equal, nothing retained
    assert retained_tokens(distance, 0.5).tolist() == [[False, False, False, True], [False] * 4]
    assert retained_tokens(distance, 0.6).tolist() == [[False, True, False, True], [False] * 4]
    assert retained_tokens(distance, 0.0).tolist() == [[False] * 4] * 2
    assert retained_tokens(distance, 1.0).tolist() == [[False, True, True, True], [False] * 4]
    a = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]])
    b = torch.tensor([[[1.0, 0.1], [0.0, 1.0], [1.0, 0.0]]])  # token 1: 90 degrees apart, retained
    pair = MergedPair.merge(a, b, 0.5, 0.5)
    assert pair.retained.tolist() == [[False, True, False]]
    assert torch.equal(pair.read(0)[0, 1], a[0, 1]) and torch.equal(pair.read(1)[0, 1], b[0, 1])


def test_minicache_default_gamma_retains_only_the_most_distinct_pairs():
    # Five tokens whose directions differ by 0, 30, 60, 90 and 180 degrees between the layers: distances 0, 1/6,
    # 1/3, 1/2 and 1. At the paper's gamma 0.05 only the opposite pair lies within 0.05 of d_max; a threshold
    # d_min + gamma (d_max - d_min) used as a lower bound would retain the four pairs above 0.05.
    angles = torch.tensor([0.0, 30.0, 60.0, 90.0, 180.0]) * math.pi / 180
    a = torch.tensor([[1.0, 0.0]]).expand(5, 2)[None]
    b = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)[None] * 2.0
    pair = MergedPair.merge(a, b, 0.6, 0.05)
    assert pair.retained.tolist() == [[False, False, False, False, True]]
    # more retained as gamma grows (the paper's ablation: larger gamma, lower compression)
    counts = [int(MergedPair.merge(a, b, 0.6, gamma).retained.sum()) for gamma in (0.0, 0.05, 0.6, 0.7, 0.9)]
    assert counts == [0, 1, 2, 3, 4]
    # the identical pair reconstructs exactly from the shared direction and its norms; the retained one is stored
    assert torch.allclose(pair.read(0)[0, 0], a[0, 0]) and torch.allclose(pair.read(1)[0, 0], b[0, 0])
    assert torch.equal(pair.read(1)[0, 4], b[0, 4])


def test_minicache_row_says_when_merging_grows_the_cache(tiny_lm):
    tokens = list(range(5, 45))
    pre = prefill(tiny_lm, tokens, 0, Stopwatch(tiny_lm.device), [])
    plain = pre.cache.layers[2].nbytes() + pre.cache.layers[3].nbytes()
    for gamma, freed in ((0.0, True), (1.0, False)):
        cache = pre.cache.copy()
        ctx = CompressionContext.for_prompt(tiny_lm, len(tokens), len(tokens), pre)
        method = build_method({"name": "minicache", "retention_gamma": gamma})
        method.setup(cache, ctx)
        method.after_compress(cache, ctx)
        merged = cache.layers[2].nbytes() + cache.layers[3].nbytes()
        assert ctx.record["minicache_bytes_plain_pairs"] == plain
        assert ctx.record["minicache_bytes_merged_pairs"] == merged
        assert ctx.record["memory_freed"] is freed and (merged < plain) is freed


def test_minicache_pairs():
    assert merged_pairs(4, 0.5) == [(2, 3)]
    assert merged_pairs(30, 0.5) == [(15, 16), (17, 18), (19, 20), (21, 22), (23, 24), (25, 26), (27, 28)]
    assert merged_pairs(5, 0.0) == [(0, 1), (2, 3)]


def test_minicache_cache_holds_one_direction_per_pair_and_counts_it_once(tiny_lm):
    tokens = list(range(5, 45))
    pre = prefill(tiny_lm, tokens, 0, Stopwatch(tiny_lm.device), [])
    cache = pre.cache.copy()
    method = build_method({"name": "minicache", "retention_gamma": 0.5})
    ctx = CompressionContext.for_prompt(tiny_lm, len(tokens), len(tokens), pre)
    method.setup(cache, ctx)
    method.after_compress(cache, ctx)
    assert ctx.record["minicache_pairs"] == [[2, 3]]
    assert all(type(layer) is KVLayer for layer in cache.layers[:2])
    first, second = cache.layers[2], cache.layers[3]
    assert isinstance(first, DepthMergedLayer) and first.merged_keys is second.merged_keys
    element = torch.empty((), dtype=tiny_lm.dtype).element_size()
    heads, d, n = tiny_lm.num_kv_heads, tiny_lm.config.head_dim, len(tokens)
    for tensor in ("keys", "values"):
        pair = getattr(first, f"merged_{tensor}")
        retained = int(pair.retained.sum())
        for side, layer in enumerate((first, second)):
            truth = getattr(pre.cache.layers[2 + side], tensor)[0]
            read = getattr(layer, tensor)[0]
            assert torch.equal(read[pair.retained], truth[pair.retained])
            norms = truth.float().norm(dim=-1)
            assert torch.allclose(read.float().norm(dim=-1), norms, rtol=1e-4)  # magnitudes kept per layer
        assert pair.shared_nbytes() == heads * n * d * element + heads * n
        assert pair.own_nbytes(0) == heads * n * element + retained * d * element
    pairs = (first.merged_keys, first.merged_values)
    held = sum(pair.shared_nbytes() + pair.own_nbytes(0) + pair.own_nbytes(1) for pair in pairs)
    assert first.nbytes() + second.nbytes() == held
    assert cache.kv_bytes() == 2 * pre.cache.layers[0].nbytes() + held
    # a decode step appends the new token unmerged to each layer
    forward_tokens(tiny_lm, cache, [60])
    assert first.get_seq_length() == n + 1 and first.tail_keys.shape[1] == 1
    assert first.nbytes() + second.nbytes() == held + 2 * heads * 2 * d * element


def test_minicache_copy_is_independent():
    keys = torch.randn(2, 5, 4)
    cache = KVCache(2)
    for layer in cache.layers:
        layer.update(keys[None], keys[None], positions=torch.arange(5))
    ctx = CompressionContext(budget=5, prompt_len=5, num_heads=2, num_kv_heads=2)
    build_method({"name": "minicache", "start_fraction": 0.0}).after_compress(cache, ctx)
    copied = cache.copy()
    new = torch.randn(1, 2, 1, 4)
    copied.layers[0].update(new, new, positions=torch.tensor([5]))
    assert cache.layers[0].get_seq_length() == 5 and copied.layers[0].get_seq_length() == 6
    assert cache.layers[0].positions.tolist() == [[0, 1, 2, 3, 4]] * 2


@pytest.mark.parametrize("field", ["start_fraction", "interpolation", "retention_gamma"])
def test_minicache_refuses_bad_hyperparameters_in_one_line(field):
    with pytest.raises(ValueError, match=rf"^minicache {field} must be in \[0, 1\], got 1.5$"):
        build_method({"name": "minicache", field: 1.5})
