"""Sampler unit tests: exact tokens, penalty arithmetic, logprobs and per-request reproducibility (CPU)."""

import math

import pytest
import torch

from kvserve.sampler import Sampler, SamplingRow, compute_logprobs
from kvserve.sampling_params import SamplingParams

V = 1000


def random_logits(batch: int, seed: int = 0, vocab: int = V) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((batch, vocab), generator=gen) * 3


def row(params: SamplingParams | None = None, prompt=(), output=(), seed: int | None = None) -> SamplingRow:
    params = params or SamplingParams()
    generator = None
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
    return SamplingRow(params, list(prompt), list(output), generator)


def sample(logits: torch.Tensor, rows: list[SamplingRow]):
    return Sampler()(logits, rows)


def test_greedy_is_argmax():
    logits = random_logits(6)
    result = sample(logits, [row(SamplingParams(temperature=0.0)) for _ in range(6)])
    assert result.token_ids == logits.argmax(-1).tolist()
    assert result.logprobs == [None] * 6
    assert result.ranks == [None] * 6


def test_sampler_does_not_modify_logits():
    logits = random_logits(3)
    before = logits.clone()
    params = SamplingParams(temperature=0.7, top_k=5, top_p=0.8, min_p=0.1, repetition_penalty=1.3, min_tokens=3)
    params._eos_token_ids = {7}
    sample(logits, [row(params, prompt=[1, 2], output=[3], seed=1) for _ in range(3)])
    assert torch.equal(logits, before)


def test_writable_logits_give_the_same_tokens():
    """logits_writable lets the sampler mask and scale the caller's logits in place instead of a copy: the
    tokens drawn are the same, and logits are still left alone when a row reports logprobs."""
    params = SamplingParams(temperature=0.7, top_k=5, top_p=0.8, min_p=0.1, repetition_penalty=1.3, min_tokens=3)
    params._eos_token_ids = {7}
    greedy = SamplingParams(temperature=0.0, min_tokens=3, logit_bias={5: 3.0})
    greedy._eos_token_ids = {7}
    for p in (params, greedy):
        logits = random_logits(4, seed=3)
        rows = [row(p, prompt=[1, 2], output=[3], seed=i) for i in range(4)]
        expected = Sampler()(logits, rows).token_ids
        rows = [row(p, prompt=[1, 2], output=[3], seed=i) for i in range(4)]
        assert Sampler()(logits.clone(), rows, logits_writable=True).token_ids == expected
    logits = random_logits(2, seed=4)
    before = logits.clone()
    reporting = SamplingParams(temperature=0.0, min_tokens=3, logprobs=2)
    reporting._eos_token_ids = {7}
    Sampler()(logits, [row(reporting, prompt=[1], output=[]) for _ in range(2)], logits_writable=True)
    assert torch.equal(logits, before)


def test_top_k_1_equals_greedy_at_high_temperature():
    logits = random_logits(8, seed=1)
    greedy = sample(logits, [row(SamplingParams(temperature=0.0)) for _ in range(8)]).token_ids
    torch.manual_seed(0)
    for _ in range(5):
        rows = [row(SamplingParams(temperature=1.5, top_k=1)) for _ in range(8)]
        assert sample(logits, rows).token_ids == greedy


def test_greedy_and_sampled_rows_mix_in_one_batch():
    logits = random_logits(4, seed=2)
    rows = [
        row(SamplingParams(temperature=0.0)),
        row(SamplingParams(temperature=1.0), seed=3),
        row(SamplingParams(temperature=0.0, logprobs=1)),
        row(SamplingParams(temperature=1.0, top_p=1e-6)),
    ]
    tokens = sample(logits, rows).token_ids
    argmax = logits.argmax(-1).tolist()
    assert tokens[0] == argmax[0] and tokens[2] == argmax[2] and tokens[3] == argmax[3]


def test_seeded_sampling_reproduces_and_is_independent_of_batch():
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    others = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.3, top_k=7),
        SamplingParams(temperature=0.5, top_p=0.5, min_p=0.05),
        SamplingParams(temperature=1.0, repetition_penalty=1.2, presence_penalty=0.5, logprobs=3),
        SamplingParams(temperature=0.8, seed=99),
    ]
    alone_gen = torch.Generator().manual_seed(1234)
    batch_gen = torch.Generator().manual_seed(1234)
    other_gens = [torch.Generator().manual_seed(99) if p.seed is not None else None for p in others]
    sampler = Sampler()
    alone_tokens, batch_tokens = [], []
    torch.manual_seed(0)
    for step in range(20):
        logits = random_logits(6, seed=100 + step)
        alone = sampler(logits[3:4], [SamplingRow(params, [5, 6], list(alone_tokens), alone_gen)])
        alone_tokens.append(alone.token_ids[0])
        rows = [SamplingRow(p, [1, 2, 3], [4], g) for p, g in zip(others[:3], other_gens[:3], strict=True)]
        rows.append(SamplingRow(params, [5, 6], list(batch_tokens), batch_gen))
        rows += [SamplingRow(p, [1, 2, 3], [4], g) for p, g in zip(others[3:], other_gens[3:], strict=True)]
        batch_tokens.append(sampler(logits, rows).token_ids[3])
    assert batch_tokens == alone_tokens
    # Reproducible: a fresh generator with the same seed gives the same stream again.
    again_gen = torch.Generator().manual_seed(1234)
    again = []
    for step in range(20):
        logits = random_logits(6, seed=100 + step)
        again.append(sampler(logits[3:4], [SamplingRow(params, [5, 6], list(again), again_gen)]).token_ids[0])
    assert again == alone_tokens


def test_different_seeds_differ():
    logits = random_logits(1, seed=5)
    params = SamplingParams(temperature=1.0)
    streams = []
    for seed in (1, 2):
        gen = torch.Generator().manual_seed(seed)
        streams.append([sample(logits, [SamplingRow(params, [], [], gen)]).token_ids[0] for _ in range(20)])
    assert streams[0] != streams[1]


def test_seeded_row_does_not_disturb_default_rng_use_of_unseeded_rows():
    # Unseeded rows draw from the default RNG; seeded rows must not consume it.
    logits = random_logits(2, seed=6)
    params = SamplingParams(temperature=1.0)
    torch.manual_seed(7)
    mixed = [sample(logits, [row(params, seed=3), row(params)]).token_ids[1] for _ in range(10)]
    torch.manual_seed(7)
    plain = [sample(logits[1:2], [row(params)]).token_ids[0] for _ in range(10)]
    assert mixed == plain


def test_tiny_top_p_selects_argmax():
    logits = random_logits(5, seed=8)
    torch.manual_seed(0)
    rows = [row(SamplingParams(temperature=1.0, top_p=1e-6)) for _ in range(5)]
    for _ in range(5):
        assert sample(logits, rows).token_ids == logits.argmax(-1).tolist()


def test_min_p_one_selects_argmax():
    logits = random_logits(5, seed=9)
    torch.manual_seed(0)
    rows = [row(SamplingParams(temperature=2.0, min_p=1.0)) for _ in range(5)]
    for _ in range(5):
        assert sample(logits, rows).token_ids == logits.argmax(-1).tolist()


def test_top_k_3_only_returns_top_3_ids():
    logits = random_logits(1, seed=10)
    logits /= 4  # flatter, so all three get drawn
    top3 = set(logits[0].topk(3).indices.tolist())
    batch = logits.expand(200, V).contiguous()
    torch.manual_seed(0)
    seen = set()
    for _ in range(5):
        seen |= set(sample(batch, [row(SamplingParams(temperature=2.0, top_k=3)) for _ in range(200)]).token_ids)
    assert seen == top3


def test_top_p_keeps_smallest_set_reaching_top_p():
    # probs 0.5, 0.3, 0.2: top_p 0.7 needs {0, 1}; top_p 0.5 needs only {0}.
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).expand(300, 3).contiguous()
    torch.manual_seed(0)
    tokens = sample(logits, [row(SamplingParams(top_p=0.7)) for _ in range(300)]).token_ids
    assert set(tokens) == {0, 1}
    tokens = sample(logits, [row(SamplingParams(top_p=0.5)) for _ in range(300)]).token_ids
    assert set(tokens) == {0}


def test_min_tokens_masks_eos_and_stop_token_ids():
    logits = torch.zeros((3, 10))
    logits[:, 4] = 10.0  # EOS
    logits[:, 6] = 9.0  # stop token
    logits[:, 2] = 8.0
    params = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[6], ignore_eos=True)
    params._eos_token_ids = {4}
    rows = [row(params, output=[]), row(params, output=[1]), row(params, output=[1, 1])]
    assert sample(logits, rows).token_ids == [2, 2, 4]  # masked until 2 tokens exist, even with ignore_eos


def test_logit_bias_adds_to_its_rows_tokens_only():
    """OpenAI's logit_bias: added to the raw logits before sampling; +100 forces a token, -100 bans one;
    other rows and the logprobs (of the raw distribution) are untouched."""
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [1.0, 3.0, 2.0, 0.0], [1.0, 3.0, 2.0, 0.0]])
    rows = [
        row(SamplingParams(temperature=0.0, logit_bias={3: 100})),  # forced
        row(SamplingParams(temperature=0.0, logit_bias={1: -100, 0: 1.5}, logprobs=1)),  # 1 banned: 0 (2.5) wins
        row(SamplingParams(temperature=0.0)),
    ]
    result = sample(logits, rows)
    assert result.token_ids == [3, 0, 1]
    raw = torch.log_softmax(logits[1], -1)
    assert result.logprobs[1] == {1: raw[1].item(), 0: raw[0].item()}  # top-1 and the sampled token, raw
    with pytest.raises(ValueError, match="logit_bias values must be numbers in \\[-100, 100\\]"):
        SamplingParams(logit_bias={3: 101})
    with pytest.raises(ValueError, match="logit_bias keys must be token ids"):
        SamplingParams(logit_bias={-1: 1})


def test_repetition_penalty_arithmetic():
    import kvserve.sampler as sampler_module

    logits = torch.tensor([[2.0, -1.0, 3.0, -0.5, 1.0, 0.0]])
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0, logprobs=0)
    # token 0 (prompt), 1 (prompt), 3 (output), 5 (output, zero logit); tokens 2 and 4 are untouched.
    expected = torch.tensor([[1.0, -2.0, 3.0, -1.0, 1.0, 0.0]])
    work = logits.clone()
    sampler_module._apply_penalties(work, [row(params, prompt=[0, 1, 0], output=[3, 5, 3])], [0])
    assert torch.equal(work, expected)
    # Token 2 was never seen, so it keeps 3.0 and stays the greedy pick.
    assert sample(logits, [row(params, prompt=[0, 1], output=[3, 5])]).token_ids == [2]
    # The penalty can change the pick: 2.5 beats 3.0 / 2.
    logits2 = torch.tensor([[2.5, 3.0]])
    params2 = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    assert sample(logits2, [row(params2, prompt=[1])]).token_ids == [0]


def test_presence_and_frequency_arithmetic():
    import kvserve.sampler as sampler_module

    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0], [1.0, 2.0, 3.0, 4.0, 5.0], [0.5, 0.5, 0.5, 0.5, 0.5]])
    p_both = SamplingParams(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.25)
    p_none = SamplingParams(temperature=0.0)
    p_rep = SamplingParams(temperature=0.0, repetition_penalty=2.0, frequency_penalty=-1.0)
    rows = [
        row(p_both, prompt=[0, 0, 0], output=[4, 4, 4, 2]),  # prompt tokens are not counted
        row(p_none, prompt=[4], output=[4]),
        row(p_rep, prompt=[0], output=[1, 1]),
    ]
    work = logits.clone()
    sampler_module._apply_penalties(work, rows, [0, 2])
    expected = torch.tensor(
        [
            [1.0, 2.0, 3.0 - 0.25 - 0.5, 4.0, 5.0 - 0.75 - 0.5],
            [1.0, 2.0, 3.0, 4.0, 5.0],
            [0.25, 0.25 + 2.0, 0.5, 0.5, 0.5],  # repetition first (0.5 / 2), then -(-1) * count
        ]
    )
    assert torch.equal(work, expected)
    # Greedy after penalties: row 0 picks 3 (4.0 > 3.75), row 1 picks 4, row 2 picks 1.
    assert sample(logits, rows).token_ids == [3, 4, 1]


def test_logprobs_top_n_plus_sampled_token_exact():
    logits = random_logits(4, seed=11)
    expected = torch.log_softmax(logits, dim=-1)
    rows = [
        row(SamplingParams(temperature=1.0, logprobs=5), seed=1),
        row(SamplingParams(temperature=1.0, logprobs=0), seed=2),
        row(SamplingParams(temperature=1.0)),
        row(SamplingParams(temperature=0.7, top_k=20, logprobs=2, repetition_penalty=1.5), prompt=[1], seed=3),
    ]
    result = sample(logits, rows)
    assert result.logprobs[2] is None and result.ranks[2] is None
    for i, n in ((0, 5), (1, 0), (3, 2)):
        token = result.token_ids[i]
        top = expected[i].topk(n).indices.tolist()
        entry = result.logprobs[i]
        assert set(entry) == set(top) | {token}
        for t, lp in entry.items():
            assert lp == expected[i, t].item()  # raw distribution, exact
        assert result.ranks[i] == int((expected[i] > expected[i, token]).sum()) + 1


def test_ranks_of_greedy_and_forced_tokens():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    assert sample(logits, [row(SamplingParams(temperature=0.0, logprobs=1))]).ranks == [1]
    # Force token 2 (third most likely) through min-p? No: through banning 1 and 3 with min_tokens.
    params = SamplingParams(temperature=0.0, logprobs=2, min_tokens=1, stop_token_ids=[1, 3])
    result = sample(logits, [row(params)])
    assert result.token_ids == [2]
    assert result.ranks == [3]  # ranked under the raw distribution, not the masked one
    raw = torch.log_softmax(logits[0], dim=-1)
    assert result.logprobs == [{1: raw[1].item(), 3: raw[3].item(), 2: raw[2].item()}]


def test_temperature_zero_with_logprobs_returns_argmax():
    logits = random_logits(3, seed=12)
    result = sample(logits, [row(SamplingParams(temperature=0.0, logprobs=3)) for _ in range(3)])
    assert result.token_ids == logits.argmax(-1).tolist()
    assert result.ranks == [1, 1, 1]
    expected = torch.log_softmax(logits, dim=-1)
    for i in range(3):
        assert result.logprobs[i] == dict(
            zip(expected[i].topk(3).indices.tolist(), expected[i].topk(3).values.tolist(), strict=True)
        )


def test_compute_logprobs_helper():
    logits = random_logits(3, seed=13)
    targets = torch.tensor([5, 17, 999])
    token_lp, top_lp, top_ids = compute_logprobs(logits, targets, 4)
    expected = torch.log_softmax(logits, dim=-1)
    assert torch.equal(token_lp, expected[torch.arange(3), targets])
    assert torch.equal(top_lp, expected.topk(4).values)
    assert torch.equal(top_ids, expected.topk(4).indices)
    _, top_lp0, top_ids0 = compute_logprobs(logits, targets, 0)
    assert top_lp0.shape == (3, 0) and top_ids0.shape == (3, 0)


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    n = 2000
    logits = torch.log(probs).expand(n, 3).contiguous()
    torch.manual_seed(0)
    tokens = torch.tensor(sample(logits, [row(SamplingParams(temperature=1.0)) for _ in range(n)]).token_ids)
    counts = torch.bincount(tokens, minlength=3).double()
    for p, c in zip(probs.tolist(), counts.tolist(), strict=True):
        sd = math.sqrt(n * p * (1 - p))
        assert abs(c - n * p) < 5 * sd  # 5 sigma: never flaky, still catches a wrong distribution


def test_temperature_flattens_and_sharpens():
    logits = torch.log(torch.tensor([0.6, 0.3, 0.1])).expand(2000, 3).contiguous()
    torch.manual_seed(1)
    cold = sample(logits, [row(SamplingParams(temperature=0.25)) for _ in range(2000)]).token_ids
    hot = sample(logits, [row(SamplingParams(temperature=4.0)) for _ in range(2000)]).token_ids
    # At T=0.25 token 0 has prob 0.6^4 / (0.6^4 + 0.3^4 + 0.1^4) ~ 0.94; at T=4 ~ 0.41.
    assert cold.count(0) > 1800
    assert 700 < hot.count(0) < 950


def test_empty_batch_and_shape_check():
    assert sample(torch.zeros((0, V)), []).token_ids == []
    with pytest.raises(ValueError):
        sample(torch.zeros((2, V)), [row()])


def test_top_p_through_candidates_equals_the_full_sort():
    """Past TOP_P_CANDIDATES tokens: rows whose top candidates hold top_p (peaked) and rows that need the
    full sort (flat) keep exactly the set a full sort keeps."""
    from kvserve.sampler import TOP_P_CANDIDATES, _apply_top_p

    gen = torch.Generator().manual_seed(0)
    vocab = 4 * TOP_P_CANDIDATES + 3
    logits = torch.randn(4, vocab, generator=gen) * torch.tensor([[6.0], [0.1], [3.0], [0.01]])
    top_ps = [0.9, 0.9, 0.5, 1.0]
    probs = torch.softmax(logits, -1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    keep_sorted = (sorted_probs.cumsum(-1) - sorted_probs) < torch.tensor(top_ps).unsqueeze(1)
    keep_sorted[3] = True  # top_p == 1 keeps everything
    expected = torch.empty_like(keep_sorted).scatter_(1, order, keep_sorted)
    got = logits.clone()
    _apply_top_p(got, top_ps)
    assert torch.equal(got.isfinite(), expected)
    assert expected[0].sum() < TOP_P_CANDIDATES < expected[1].sum()  # both paths were taken


def test_seed_must_fit_64_bits():
    SamplingParams(seed=-(2**63))
    SamplingParams(seed=2**63 - 2, n=2)
    for seed, n in ((2**63, 1), (2**63 - 1, 2), (-(2**63) - 1, 1)):
        with pytest.raises(ValueError, match="seed must be a 64-bit integer"):
            SamplingParams(seed=seed, n=n)
