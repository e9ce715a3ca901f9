"""RETRO's modules on a tiny random owned Llama: chunked cross-attention against its definition,
the zero-gate identity (bit-identical logits), RETRO's causal alignment (no position sees a
neighbour before the last token of the chunk it was retrieved for), and KV-cached generation one
token at a time equal to one forward pass over the whole sequence."""
from __future__ import annotations

import pytest
import torch

from memlm.kernels.chunked_attention import chunk_read_by, chunked_cross_attention_loop, chunked_cross_attention_ref as chunked_cross_attention
from memlm.model.llama import Llama, LlamaConfig
from memlm.modes.retro.adapter import RetroAdapter, RetroBatch
from memlm.modes.retro.model import RetroConfig

TINY = LlamaConfig(vocab_size=96, dim=64, intermediate_size=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16,
                   max_position_embeddings=128)
M = 8  # chunk tokens
RETRO = RetroConfig(chunk_tokens=M, neighbours=2, neighbour_tokens=M, continuation_tokens=M, layers=(1, 3),
                    encoder_layers=2, encoder_dim=32, heads=2, encoder_ffn=64)


def tiny_model() -> Llama:
    torch.manual_seed(0)
    return Llama(TINY).eval()


def trained_like(adapter: RetroAdapter) -> RetroAdapter:
    """Gates away from zero, as after training, so the CCA changes the logits."""
    with torch.no_grad():
        for m in adapter.cca.values():
            m.gate.fill_(0.7)
    return adapter


def random_neighbours(n_chunks: int, seed: int, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (B, n, k, r) and valid masks with awkward shapes: short neighbours, a missing one."""
    g = torch.Generator().manual_seed(seed)
    r = RETRO.neighbour_length
    ids = torch.randint(0, TINY.vocab_size, (batch, n_chunks, RETRO.neighbours, r), generator=g)
    lengths = torch.randint(1, r + 1, (batch, n_chunks, RETRO.neighbours), generator=g)
    lengths[0, 0, 1] = 0  # chunk 0's second neighbour is missing
    valid = torch.arange(r) < lengths[..., None]
    return ids, valid


def full_logits(model, adapter, tokens, ids, valid, phase=0):
    state = adapter.new_state(model, phase)
    for u in range(ids.shape[1]):
        state.set_neighbours(u, ids[:, u], valid[:, u])
    with adapter.reading(state), torch.no_grad():
        return model(tokens, torch.arange(tokens.shape[1]))


# --- chunked cross-attention ------------------------------------------------------------------

@pytest.mark.parametrize("start,T,first_chunk,G", [(0, 40, 0, 5), (13, 1, 0, 2), (7, 1, 0, 1), (6, 1, 0, 1),
                                                   (20, 17, 1, 3), (0, 5, 0, 1), (30, 9, 3, 0), (3, 50, 2, 2)])
def test_chunked_cross_attention_follows_its_definition(start, T, first_chunk, G):
    g = torch.Generator().manual_seed(start * 100 + T)
    B, H, dh, L = 2, 3, 8, 11
    q = torch.randn(B, H, T, dh, generator=g)
    k, v = torch.randn(B, G, H, L, dh, generator=g), torch.randn(B, G, H, L, dh, generator=g)
    valid = torch.rand(B, G, L, generator=g) > 0.3
    if G:
        valid[0, 0] = False  # a chunk without rows reads nothing
    got = chunked_cross_attention(q, k, v, valid, start, M, first_chunk)
    want = chunked_cross_attention_loop(q, k, v, valid, start, M, first_chunk)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for t in range(T):  # queries before the first chunk's last token read nothing
        if chunk_read_by(start + t, M) < first_chunk:
            assert not got[:, :, t].any()


def test_chunk_alignment_is_retros():
    # chunk u = positions [8u, 8u + 8): its neighbours are read from position 8u + 7 to 8u + 14
    assert [chunk_read_by(p, M) for p in (0, 6, 7, 14, 15, 22, 23)] == [-1, -1, 0, 0, 1, 1, 2]


# --- the model --------------------------------------------------------------------------------

def test_zero_gates_leave_the_base_model_bit_identical():
    model = tiny_model()
    tokens = torch.randint(0, TINY.vocab_size, (2, 5 * M + 3), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = model(tokens, torch.arange(tokens.shape[1]))
    adapter = RetroAdapter(TINY, RETRO, seed=3)
    adapter.attach(model)
    ids, valid = random_neighbours(5, seed=2, batch=2)
    assert torch.equal(full_logits(model, adapter, tokens, ids, valid), base)  # untrained: gates are 0
    with torch.no_grad():
        assert torch.equal(model(tokens, torch.arange(tokens.shape[1])), base)  # attached, no state: untouched
    trained_like(adapter)
    assert not torch.allclose(full_logits(model, adapter, tokens, ids, valid), base)  # the check can fail
    adapter.detach(model)
    assert all(len(b.after_attention) == 0 for b in model.layers)


@pytest.mark.parametrize("phase", [0, 3])
def test_no_position_reads_a_neighbour_before_its_chunk_is_complete(phase):
    model = tiny_model()
    adapter = trained_like(RetroAdapter(TINY, RETRO, seed=3))
    adapter.attach(model)
    n = 5
    tokens = torch.randint(0, TINY.vocab_size, (1, n * M - phase), generator=torch.Generator().manual_seed(4))
    ids, valid = random_neighbours(n, seed=5)
    base = full_logits(model, adapter, tokens, ids, valid, phase)
    for u in range(n):
        other = ids.clone()
        other[:, u] = (other[:, u] + 1) % TINY.vocab_size  # other neighbours for chunk u only
        got = full_logits(model, adapter, tokens, other, valid, phase)
        first_reader = u * M + M - 1 - phase  # the chunk's last token
        assert torch.equal(got[:, :first_reader], base[:, :first_reader]), f"a position before {first_reader} saw chunk {u}'s neighbours"
        if first_reader < tokens.shape[1]:
            assert not torch.allclose(got[:, first_reader], base[:, first_reader]), f"chunk {u}'s neighbours are not read"


@pytest.mark.parametrize("phase", [0, 5])
def test_cached_generation_equals_one_forward_pass(phase):
    model = tiny_model()
    adapter = trained_like(RetroAdapter(TINY, RETRO, seed=3))
    adapter.attach(model)
    n, prompt = 6, 2 * M + 3  # a prompt of two chunks and a bit, then token by token
    tokens = torch.randint(0, TINY.vocab_size, (1, n * M - phase), generator=torch.Generator().manual_seed(6))
    ids, valid = random_neighbours(n, seed=7)
    want = full_logits(model, adapter, tokens, ids, valid, phase)
    state, cache = adapter.new_state(model, phase), model.new_cache(1, tokens.shape[1])
    got = []
    with adapter.reading(state), torch.no_grad():
        for u in range((prompt + phase) // M):  # the prompt's completed chunks: before the prefill
            assert state.chunk_span(u)[1] <= prompt
            state.set_neighbours(u, ids[:, u], valid[:, u])
        got.append(model(tokens[:, :prompt], torch.arange(prompt), cache))
        for p in range(prompt, tokens.shape[1]):
            if (p + 1 + phase) % M == 0:  # p completes chunk u: its neighbours before the pass that feeds p
                u = (p + phase) // M
                assert state.chunk_span(u)[1] == p + 1
                state.set_neighbours(u, ids[:, u], valid[:, u])
            got.append(model(tokens[:, p : p + 1], torch.tensor([p]), cache))
    torch.testing.assert_close(torch.cat(got, 1), want, rtol=1e-4, atol=1e-5)
    assert len(state.encoded) == n and state._context.shape[1] < M  # each chunk encoded once, no old states kept


def test_training_loss_has_gradients_only_for_the_adapter():
    model = tiny_model()
    for p in model.parameters():
        p.requires_grad_(False)
    adapter = RetroAdapter(TINY, RETRO, seed=3)
    adapter.attach(model)
    tokens = torch.randint(0, TINY.vocab_size, (2, 4 * M + 1), generator=torch.Generator().manual_seed(8))
    ids, valid = random_neighbours(4, seed=9, batch=2)
    loss = adapter.loss(model, RetroBatch(tokens, neighbours=ids, neighbour_valid=valid))
    loss.backward()
    gates = [m.gate.grad for m in adapter.cca.values()]
    assert all(g is not None and bool((g != 0).all()) for g in gates)  # zero gates still learn, every head
    named = {n for n, _ in adapter.named_parameters()}
    grouped = {id(p) for g in adapter.param_groups() for p in g.params}
    assert grouped == {id(p) for p in adapter.parameters()} and named
    again = RetroAdapter.from_config(TINY, adapter.config_dict(), seed=3)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), adapter.state_dict().values()))


def test_the_cca_reads_the_base_layers_own_keys_and_values_of_each_neighbour():
    """Before the encoder has learned anything (its projections into the layers start at zero),
    the rows a CCA layer reads are the keys and values that layer computes for the neighbour's
    tokens when the neighbour is a prompt of its own (the base's KV cache), so the base's heads
    read neighbours as they read context."""
    model = tiny_model()
    adapter = RetroAdapter(TINY, RETRO, seed=4)
    ids, valid = random_neighbours(1, seed=5)
    valid[:] = True
    state = adapter.state_for(model, ids, valid)
    x = torch.randn(1, M, TINY.dim)
    state.encode(adapter.encoder, x, 0)  # chunk 0 completes: its neighbours are run and encoded
    r = RETRO.neighbour_length
    for j in range(RETRO.neighbours):
        cache = model.new_cache(1, r)
        with torch.no_grad():
            model(ids[0, 0, j][None], torch.arange(r), cache)
        for layer in RETRO.layers:
            k, v, ok = state.chunk_kv(adapter.cca[str(layer)], 0)  # (1, KV, k * r, hd)
            assert bool(ok.all())
            torch.testing.assert_close(k[0, :, j * r : (j + 1) * r], cache.k[layer, 0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(v[0, :, j * r : (j + 1) * r], cache.v[layer, 0], rtol=1e-5, atol=1e-5)


# --- neighbour states kept across generations -------------------------------------------------

def test_a_neighbour_read_again_skips_its_base_pass_and_reads_the_same_states(monkeypatch):
    from memlm.modes.retro.model import neighbour_states
    from memlm.modes.retro.state_cache import NeighbourStateCache

    model = tiny_model()
    adapter = trained_like(RetroAdapter(TINY, RETRO, seed=3))
    tokens = torch.randint(0, TINY.vocab_size, (1, 3 * M), generator=torch.Generator().manual_seed(8))
    ids, valid = random_neighbours(3, seed=9)
    ids[0, 2, 1] = ids[0, 0, 0]  # one neighbour twice in a request: computed once
    adapter.attach(model)
    want = full_logits(model, adapter, tokens, ids, valid)
    cache = NeighbourStateCache(max_bytes=1 << 30)
    computed = []

    def logits():
        state = adapter.new_state(model, 0, cache)
        for u in range(3):
            state.set_neighbours(u, ids[:, u], valid[:, u])
        with adapter.reading(state), torch.no_grad():
            return model(tokens, torch.arange(tokens.shape[1]))

    import memlm.modes.retro.model as retro_model
    real = retro_model.neighbour_states  # counted, still computed
    monkeypatch.setattr(retro_model, "neighbour_states", lambda m, x, layers: computed.append(len(x)) or real(m, x, layers))
    first, second = logits(), logits()
    torch.testing.assert_close(first, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(second, want, rtol=1e-5, atol=1e-6)
    assert computed == [5]  # 6 neighbours, 5 distinct, all computed by the first request; none by the second
    assert (cache.hits, cache.misses, len(cache)) == (6, 6, 5)  # rows: the repeat was not cached yet
    one = sum(s.numel() * s.element_size() for s in neighbour_states(model, ids[0, 0, :1], RETRO.layers).values())
    assert cache.bytes == 5 * one


def test_the_cache_evicts_the_least_recently_used_past_its_size():
    from memlm.modes.retro.model import neighbour_states
    from memlm.modes.retro.state_cache import NeighbourStateCache

    model = tiny_model()
    ids = torch.randint(0, TINY.vocab_size, (4, RETRO.neighbour_length), generator=torch.Generator().manual_seed(10))
    compute = lambda x: neighbour_states(model, x, RETRO.layers)  # noqa: E731
    one = sum(s.numel() * s.element_size() for s in compute(ids[:1]).values())
    cache = NeighbourStateCache(max_bytes=2 * one)
    cache.states(ids[:2], compute)
    cache.states(ids[:1], compute)  # 0 is now the most recent
    cache.states(ids[2:3], compute)  # evicts 1
    assert len(cache) == 2 and cache.bytes == 2 * one
    before = cache.misses
    cache.states(ids[:1], compute)
    cache.states(ids[2:3], compute)
    assert cache.misses == before
    cache.states(ids[1:2], compute)
    assert cache.misses == before + 1
    off = NeighbourStateCache(max_bytes=0)
    got = off.states(ids, compute)
    assert len(off) == 0 and off.bytes == 0
    for layer, s in compute(ids).items():
        torch.testing.assert_close(got[layer], s)


def test_the_c_decode_step_equals_the_module_path_on_q4_1_layers(qmatmul_isa, monkeypatch):
    """On a q4_1 model a decode step's cross-attention runs in one C call (query rows of wqkv only,
    the chunk's valid rows compacted); token by token it gives the module path's logits."""
    from memlm.kernels import qmatmul_cpu
    from memlm.model.quantize import quantize_model
    from memlm.modes.retro import model as retro_model

    model = quantize_model(tiny_model(), "q4_1")
    model.decode_stack = None  # each layer its own path (the one-call stack is the next test's)
    adapter = trained_like(RetroAdapter(TINY, RETRO, seed=3))
    adapter.attach(model)
    n, prompt = 6, M - 3  # the first steps read nothing, the rest one chunk each
    tokens = torch.randint(0, TINY.vocab_size, (1, n * M), generator=torch.Generator().manual_seed(6))
    ids, valid = random_neighbours(n, seed=7)  # short neighbours and a missing one: rows left out
    calls = []
    step = qmatmul_cpu.q4_1_cross_attention_step
    monkeypatch.setattr(qmatmul_cpu, "q4_1_cross_attention_step", lambda *a: calls.append(a[7].shape[1]) or step(*a))

    def decode(c_step: bool) -> torch.Tensor:
        monkeypatch.setattr(retro_model, "C_CROSS_ATTENTION", c_step)
        return decode_reading(model, adapter, tokens, prompt, ids, valid)

    module_path = decode(False)
    assert not calls
    c_path = decode(True)
    steps = tokens.shape[1] - prompt
    reading = [p for p in range(prompt, tokens.shape[1]) if chunk_read_by(p, M) >= 0]
    assert len(calls) == len(reading) * len(RETRO.layers) and steps > len(reading) > 0
    rows = {int(valid[0, chunk_read_by(p, M)].sum()) for p in reading}
    assert set(calls) == rows and max(rows) < RETRO.neighbours * RETRO.neighbour_length  # compacted rows
    torch.testing.assert_close(c_path, module_path, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(module_path, decode_without_neighbours(model, adapter, tokens, prompt), atol=1e-3)


def test_the_one_call_decode_stack_runs_the_cross_attention_and_changes_no_logit(qmatmul_isa, monkeypatch):
    """With the q4_1 decode stack, a decode step runs the CCA layers inside its one C call
    (`ChunkedCrossAttention.stack_step`), the first one keeping the decoder states for the
    encoder; a token whose chunk completes (the encoder runs between layers) or that reads a
    neighbour with no valid row takes every layer's own path. Either way the logits are the
    per-layer C path's, bit for bit."""
    from memlm.kernels import qmatmul_cpu
    from memlm.model.quantize import q4_1_decode_stack, quantize_model

    model = quantize_model(tiny_model(), "q4_1")
    adapter = trained_like(RetroAdapter(TINY, RETRO, seed=3))
    adapter.attach(model)
    n, prompt = 6, M - 3
    tokens = torch.randint(0, TINY.vocab_size, (1, n * M), generator=torch.Generator().manual_seed(6))
    ids, valid = random_neighbours(n, seed=7)
    tables = []
    real = qmatmul_cpu.q4_1_decode_stack_batch
    monkeypatch.setattr(qmatmul_cpu, "q4_1_decode_stack_batch",
                        lambda *a: tables.append(None if a[7] is None else a[7][:, 0].tolist()) or real(*a))

    def decode(stack) -> torch.Tensor:
        model.decode_stack = stack
        return decode_reading(model, adapter, tokens, prompt, ids, valid)

    layered = decode(None)
    assert tables == []
    stacked = decode(q4_1_decode_stack)
    assert torch.equal(stacked, layered)
    cross = [t for t in tables if t is not None and any(t)]
    reads = [t for t in cross if 1 in t]  # a step whose CCA layers read a chunk inside the C call
    assert reads and all(t.count(1) == len(RETRO.layers) for t in reads)
    assert len(cross) < tokens.shape[1] - prompt  # chunk-completing and invalid-row tokens took the layers' paths
    assert not torch.equal(stacked, decode_without_neighbours(model, adapter, tokens, prompt))


def decode_reading(model, adapter, tokens, prompt, ids, valid):
    """Logits of the prompt's prefill, then token by token, the adapter reading neighbours `ids`
    (valid where `valid`): the prompt's chunks get theirs before the prefill, every later chunk
    as its last token comes."""
    state, cache = adapter.new_state(model), model.new_cache(1, tokens.shape[1])
    got = []
    with adapter.reading(state), torch.no_grad():
        for u in range(prompt // M):
            state.set_neighbours(u, ids[:, u], valid[:, u])
        got.append(model(tokens[:, :prompt], torch.arange(prompt), cache))
        for p in range(prompt, tokens.shape[1]):
            if (p + 1) % M == 0:
                state.set_neighbours((p + 1) // M - 1, ids[:, p // M], valid[:, p // M])
            got.append(model(tokens[:, p : p + 1], torch.tensor([p]), cache))
    return torch.cat(got, 1)


def decode_without_neighbours(model, adapter, tokens, prompt):
    """The same token-by-token pass with the adapter reading no state: the base model."""
    cache = model.new_cache(1, tokens.shape[1])
    with torch.no_grad():
        got = [model(tokens[:, :prompt], torch.arange(prompt), cache)]
        got += [model(tokens[:, p : p + 1], torch.tensor([p]), cache) for p in range(prompt, tokens.shape[1])]
    return torch.cat(got, 1)
