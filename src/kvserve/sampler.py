"""Sampler: turns one engine step's logits [B, V] into one token per sequence.

Semantics follow vLLM. Per row, in this order:
  0. structured outputs: tokens the row's grammar does not allow next are set to -inf (a bitmask per
     constrained row, filled by the engine from the row's matcher; structured_outputs.py).
  1. min_tokens: while fewer than min_tokens tokens were generated, EOS and stop_token_ids are set to -inf.
  1b. logit_bias: each given token's bias is added to its logit (OpenAI's logit_bias; +-100 forces or bans).
  2. repetition penalty over prompt + output tokens (positive logits divided, negative multiplied).
  3. presence / frequency penalties over output tokens only.
  4. greedy rows (temperature < 1e-5, or top_k == 1) take the argmax; the others are divided by their
     temperature, filtered by top-k, top-p and min-p, and drawn by inverse CDF (one uniform per row).
Logprobs (and ranks) are those of the raw model distribution, i.e. log_softmax of the logits as given,
before any of the steps above, as vLLM returns by default.

All math is batched over the [B, V] tensor with per-row parameter tensors; Python loops only build those
small tensors (and draw seeded noise). Nothing assumes the CPU: every tensor lives on logits.device and
the results cross to the host in one final .tolist(), which is the step's only device sync.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvserve.sampling_params import SamplingParams

_NEG_INF = float("-inf")


@dataclass
class SamplingRow:
    """One sequence to sample a token for."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # tokens generated so far for this sequence
    # Per-sequence RNG when params.seed is set, created by the engine on the logits' device; else None.
    generator: torch.Generator | None = None


@dataclass
class SampleResult:
    token_ids: list[int]  # one per row
    # Per row: None if params.logprobs is None, else {token_id: logprob} for the top-N plus the sampled token.
    logprobs: list[dict[int, float] | None]
    # Per row: rank (1 = most likely) of the sampled token under the raw distribution, when logprobs requested.
    ranks: list[int | None]


def _logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, top_n: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(full log_softmax [B, V], logprob of token_ids [B], top-n logprobs [B, n], top-n ids [B, n])."""
    # float32 even for half-precision logits: log_softmax in bf16 would lose the small differences users read.
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    token_lp = logprobs.gather(-1, token_ids.long().unsqueeze(-1)).squeeze(-1)
    top_lp, top_ids = logprobs.topk(min(top_n, logprobs.shape[-1]), dim=-1)  # k == 0 gives [B, 0]
    return logprobs, token_lp, top_lp, top_ids


def compute_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, top_n: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shared helper (also used for prompt logprobs): returns (logprob of token_ids [B], top-n logprobs [B, n],
    top-n ids [B, n]), all from log_softmax of `logits` [B, V] as given. Top-n is sorted most likely first."""
    _, token_lp, top_lp, top_ids = _logprobs(logits, token_ids, top_n)
    return token_lp, top_lp, top_ids


def _is_greedy(params: SamplingParams, vocab_size: int) -> bool:
    # top_k == 1 keeps only the argmax; routing it to the argmax path (rather than masking and drawing
    # noise) makes it equal greedy exactly, ties included, and leaves its generator untouched.
    return params.greedy or params.top_k == 1 or vocab_size == 1


class Sampler:
    """Stateless: everything a step needs comes in with the rows, so one instance serves the whole engine."""

    @torch.inference_mode()
    def __call__(
        self,
        logits: torch.Tensor,
        rows: list[SamplingRow],
        allowed: tuple[list[int], torch.Tensor] | None = None,
        *,
        logits_writable: bool = False,
    ) -> SampleResult:
        """allowed: (constrained row indices, int32 bitmask [len(rows), ceil(V / 32)]): bit j of word w of
        a constrained row's bitmask allows token 32w + j; a constrained row samples only among its allowed
        tokens (the other rows' bitmask rows are not read). logits_writable: the caller reads the logits no
        more, so the steps below may work in them in place (the engine's case: it saves a [rows, V] copy per
        step, 6 MB at 32 rows of a 49k vocabulary); otherwise they are left as given."""
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits must be [len(rows), V], got {tuple(logits.shape)} for {len(rows)} rows")
        batch, vocab = logits.shape
        if batch == 0:
            return SampleResult([], [], [])
        device = logits.device
        params = [row.params for row in rows]
        greedy = [_is_greedy(p, vocab) for p in params]
        constrained = set(allowed[0]) if allowed is not None else set()
        # a constrained row ends where its grammar does: min_tokens does not ban the end-of-sequence
        # token the grammar may be allowing alone
        min_token_rows = [
            i
            for i, row in enumerate(rows)
            if len(row.output_token_ids) < row.params.min_tokens and i not in constrained
        ]
        penalty_rows = [i for i, p in enumerate(params) if p.has_penalties]
        bias_rows = [i for i, p in enumerate(params) if p.logit_bias]
        logprob_rows = [i for i, p in enumerate(params) if p.logprobs is not None]

        # Fast path, the common case for plain greedy decoding: nothing to modify, nothing to report.
        modified = min_token_rows or penalty_rows or bias_rows or constrained
        if all(greedy) and not modified and not logprob_rows:
            return SampleResult(logits.argmax(dim=-1).tolist(), [None] * batch, [None] * batch)

        # The steps below work in place. On a float32 copy unless the caller gave the logits up; a copy in any
        # case when a row reports logprobs, which come from the raw logits.
        in_place = logits_writable and not logprob_rows and logits.dtype == torch.float32
        work = logits if in_place else logits.to(torch.float32, copy=True)
        if allowed is not None:
            _apply_token_bitmask(work, *allowed)
        if min_token_rows:
            _mask_stop_tokens(work, rows, min_token_rows)
        if bias_rows:
            _apply_logit_bias(work, params, bias_rows)
        if penalty_rows:
            _apply_penalties(work, rows, penalty_rows)

        sample_rows = [i for i, g in enumerate(greedy) if not g]
        if len(sample_rows) == batch:
            tokens = _sample(work, rows)
        else:
            tokens = work.argmax(dim=-1)
            if sample_rows:
                # Sampling only the non-greedy rows: greedy rows need no softmax or noise.
                index = torch.tensor(sample_rows, device=device)
                tokens.index_copy_(0, index, _sample(work[index], [rows[i] for i in sample_rows]))

        if not logprob_rows:
            return SampleResult(tokens.tolist(), [None] * batch, [None] * batch)
        return _with_logprobs(logits, tokens, rows, logprob_rows)


def _apply_token_bitmask(work: torch.Tensor, row_ids: list[int], bitmask: torch.Tensor) -> None:
    """Sets to -inf the logits of rows row_ids whose token's bit is clear in bitmask[row] (xgrammar's
    layout, one row per row of work: word w, bit j <-> token 32w + j; tokens past its width are
    disallowed). On the CPU through xgrammar's own loop (5 ms for 32 rows of 49,152 against 10 ms for
    the tensor unpacking below, which is the path elsewhere)."""
    if work.is_cpu and work.dtype == torch.float32 and bitmask.shape[1] * 32 >= work.shape[1]:
        import xgrammar  # present: only constrained requests pass a bitmask

        xgrammar.apply_token_bitmask_inplace(work, bitmask, indices=row_ids)
        return
    device, vocab = work.device, work.shape[1]
    index = torch.tensor(row_ids, device=device)
    shifts = torch.arange(32, dtype=torch.int32, device=device)
    bits = (bitmask.to(device)[index].unsqueeze(-1) >> shifts) & 1  # [R, W, 32]
    allowed = torch.zeros((len(row_ids), vocab), dtype=torch.bool, device=device)
    width = min(vocab, bits.shape[1] * 32)
    allowed[:, :width] = bits.flatten(1)[:, :width].bool()
    work[index] = work[index].masked_fill(~allowed, _NEG_INF)


def _apply_logit_bias(work: torch.Tensor, params: list[SamplingParams], row_ids: list[int]) -> None:
    """work[i, token] += bias for every (token, bias) of each row's logit_bias, in one scatter."""
    rows, cols, values = [], [], []
    for i in row_ids:
        for token, bias in params[i].logit_bias.items():
            rows.append(i)
            cols.append(token)
            values.append(float(bias))
    device = work.device
    index = (torch.tensor(rows, device=device), torch.tensor(cols, device=device))
    work.index_put_(index, torch.tensor(values, device=device, dtype=work.dtype), accumulate=True)


def _mask_stop_tokens(work: torch.Tensor, rows: list[SamplingRow], row_ids: list[int]) -> None:
    """Bans EOS and stop_token_ids in rows still short of min_tokens (EOS even with ignore_eos: the user asked
    for at least min_tokens tokens, and vLLM bans all stop ids here)."""
    vocab = work.shape[1]
    mask_rows: list[int] = []
    mask_cols: list[int] = []
    for i in row_ids:
        p = rows[i].params
        for token in set(p._eos_token_ids) | set(p.stop_token_ids):
            if 0 <= token < vocab:  # a configured id beyond the logits can never be sampled anyway
                mask_rows.append(i)
                mask_cols.append(token)
    if mask_rows:
        device = work.device
        work[torch.tensor(mask_rows, device=device), torch.tensor(mask_cols, device=device)] = _NEG_INF


def _apply_penalties(work: torch.Tensor, rows: list[SamplingRow], row_ids: list[int]) -> None:
    """Repetition, then frequency and presence penalties, on the rows that have any (tensors built for those only)."""
    device, vocab = work.device, work.shape[1]
    whole = len(row_ids) == work.shape[0]
    index = None if whole else torch.tensor(row_ids, device=device)
    sub = work if whole else work[index]
    sub_rows = [rows[i] for i in row_ids]
    n = len(sub_rows)

    # Output token counts via flat (row, token) pairs: no padding to the longest sequence.
    out_r = [r for r, row in enumerate(sub_rows) for _ in row.output_token_ids]
    out_t = [t for row in sub_rows for t in row.output_token_ids]
    counts = torch.zeros((n, vocab), dtype=torch.float32, device=device)
    if out_t:
        pairs = (torch.tensor(out_r, device=device), torch.tensor(out_t, device=device))
        counts.index_put_(pairs, torch.ones(len(out_t), dtype=torch.float32, device=device), accumulate=True)
    seen_in_output = counts > 0

    repetition = [row.params.repetition_penalty for row in sub_rows]
    if any(r != 1.0 for r in repetition):
        seen = seen_in_output.clone()
        # Prompt tokens only for rows that use the repetition penalty: prompts can be long.
        pr_r = [r for r, row in enumerate(sub_rows) if repetition[r] != 1.0 for _ in row.prompt_token_ids]
        pr_t = [t for r, row in enumerate(sub_rows) if repetition[r] != 1.0 for t in row.prompt_token_ids]
        if pr_t:
            seen[torch.tensor(pr_r, device=device), torch.tensor(pr_t, device=device)] = True
        penalty = torch.tensor(repetition, dtype=torch.float32, device=device).unsqueeze(1)
        # Dividing a positive logit and multiplying a negative one both make the token less likely
        # (CTRL / HF / vLLM); rows with penalty 1.0 are unchanged exactly (x / 1 == x * 1 == x).
        penalized = torch.where(sub > 0, sub / penalty, sub * penalty)
        sub = torch.where(seen, penalized, sub)

    frequency = [row.params.frequency_penalty for row in sub_rows]
    presence = [row.params.presence_penalty for row in sub_rows]
    if any(f != 0.0 for f in frequency) or any(p != 0.0 for p in presence):
        freq = torch.tensor(frequency, dtype=torch.float32, device=device).unsqueeze(1)
        pres = torch.tensor(presence, dtype=torch.float32, device=device).unsqueeze(1)
        # Two subtractions in vLLM's order (frequency, then presence) so results match it bit for bit.
        sub = sub - freq * counts
        sub = sub - pres * seen_in_output.to(torch.float32)

    if whole:
        work.copy_(sub)
    else:
        work[index] = sub


def _sample(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p, then one draw per row. `logits` [R, V] is a scratch tensor (modified)."""
    device, vocab = logits.device, logits.shape[1]
    params = [row.params for row in rows]

    temperatures = [p.temperature for p in params]
    if any(t != 1.0 for t in temperatures):
        logits.div_(torch.tensor(temperatures, dtype=torch.float32, device=device).unsqueeze(1))

    # top_k >= V keeps everything: treat it as off so topk never asks for more than V.
    top_ks = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    if any(top_ks):
        _apply_top_k(logits, top_ks)

    top_ps = [p.top_p for p in params]
    if any(p < 1.0 for p in top_ps):
        _apply_top_p(logits, top_ps)

    min_ps = [p.min_p for p in params]
    if any(m > 0.0 for m in min_ps):
        _apply_min_p(logits, min_ps)

    probs = torch.softmax(logits, dim=-1)
    return _inverse_cdf_draw(probs, _uniforms(rows, device))


def _inverse_cdf_draw(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row with probability probs[row, token]: the first token whose cumulative probability
    exceeds u x total. A token of probability 0 spans an empty interval and is never drawn. The sums are
    float64, so their rounding (~1e-16 of the total) is far below any probability a row holds.
    Why not the "exponential race" (argmax p / E, E ~ Exp(1) per token): it needs V random numbers per
    row, and torch's exponential_ on the CPU took 46 ms for 32 rows of 49,152 (a whole decode step is
    ~100 ms); one uniform per row and a cumulative sum take ~3 ms."""
    cdf = probs.double().cumsum_(dim=-1)
    targets = (uniforms * cdf[:, -1]).unsqueeze(1)
    return torch.searchsorted(cdf, targets, right=True).squeeze(1).clamp_max_(probs.shape[1] - 1)


def _apply_top_k(logits: torch.Tensor, top_ks: list[int]) -> None:
    """Keeps the k largest logits per row (k == 0: row untouched). Ties with the k-th value are kept, as in vLLM."""
    device = logits.device
    k = torch.tensor(top_ks, device=device)
    # One topk at the largest k serves every row; its values are exact copies, so each row's k-th value
    # (and hence its result) does not depend on the other rows' k.
    values = logits.topk(max(top_ks), dim=-1).values
    kth = values.gather(1, (k - 1).clamp_min(0).unsqueeze(1))
    kth = kth.masked_fill((k == 0).unsqueeze(1), _NEG_INF)
    logits.masked_fill_(logits < kth, _NEG_INF)


# Most likely tokens looked at first by top-p: when they hold top_p of the mass (the usual case), the
# kept set lies among them and the full sort is skipped (32 x 49,152 logits: topk(256) ~6 ms, sort ~73).
TOP_P_CANDIDATES = 256


def _apply_top_p(logits: torch.Tensor, top_ps: list[float]) -> None:
    """Keeps the smallest set of most likely tokens whose probability sums to >= top_p (at least one token)."""
    device, vocab = logits.device, logits.shape[1]
    top_p = torch.tensor(top_ps, dtype=torch.float32, device=device).unsqueeze(1)
    probs = torch.softmax(logits, dim=-1)
    # The candidates, most likely first, and the mass strictly before each: a token is needed while that
    # mass is still < top_p (the first one's is exactly 0, so at least one token survives). Where the
    # candidates hold >= top_p, every token past them has at least that mass before it: dropped.
    cand_probs, cand_ids = probs.topk(min(vocab, TOP_P_CANDIDATES), dim=-1)
    cand_mass = cand_probs.cumsum(dim=-1)
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, cand_ids, (cand_mass - cand_probs) < top_p)
    short = (cand_mass[:, -1] < top_p[:, 0]) & (top_p[:, 0] < 1.0)  # top_p == 1 rows keep everything anyway
    uncovered = short.nonzero().flatten().tolist() if cand_ids.shape[1] < vocab else []
    if uncovered:  # a flat distribution: the full sort, for those rows only
        index = torch.tensor(uncovered, device=device)
        sorted_probs, order = probs[index].sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        keep[index] = torch.empty_like(order, dtype=torch.bool).scatter_(1, order, mass_before < top_p[index])
    # Rows with top_p == 1 keep everything: rounding in the cumsum can reach 1.0 before the tail and
    # would otherwise drop tiny-probability tokens that top_p == 1 promises to keep.
    logits.masked_fill_(~keep & (top_p < 1.0), _NEG_INF)


def _apply_min_p(logits: torch.Tensor, min_ps: list[float]) -> None:
    """Drops tokens with prob < min_p * (max prob of the row); min_p == 0 drops nothing, the argmax always stays."""
    min_p = torch.tensor(min_ps, dtype=torch.float32, device=logits.device).unsqueeze(1)
    probs = torch.softmax(logits, dim=-1)
    logits.masked_fill_(probs < probs.amax(dim=-1, keepdim=True) * min_p, _NEG_INF)


def _uniforms(rows: list[SamplingRow], device: torch.device) -> torch.Tensor:
    """One float64 uniform in [0, 1) per row: a seeded row's from its own generator (one draw a step, so
    its stream advances the same way in any batch), the others' from the default RNG in one call (which
    seeded rows never touch)."""
    uniforms = torch.empty(len(rows), dtype=torch.float64, device=device)
    seeded = [i for i, row in enumerate(rows) if row.generator is not None]
    for i in seeded:
        uniforms[i] = torch.rand((), dtype=torch.float64, device=device, generator=rows[i].generator)
    unseeded = [i for i, row in enumerate(rows) if row.generator is None]
    if len(unseeded) == len(rows):
        uniforms.uniform_()
    elif unseeded:
        uniforms[torch.tensor(unseeded, device=device)] = torch.rand(len(unseeded), dtype=torch.float64, device=device)
    return uniforms


def _with_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, rows: list[SamplingRow], logprob_rows: list[int]
) -> SampleResult:
    """Raw-distribution logprobs for the rows that asked, packed with the tokens so one .tolist() brings all home."""
    batch = len(rows)
    device = logits.device
    whole = len(logprob_rows) == batch
    index = None if whole else torch.tensor(logprob_rows, device=device)
    raw = logits if whole else logits[index]  # log_softmax only where asked: [B, V] floats can be large
    chosen = tokens if whole else tokens[index]
    top_n = max(rows[i].params.logprobs for i in logprob_rows)
    full, token_lp, top_lp, top_ids = _logprobs(raw, chosen, top_n)
    # Rank as vLLM counts it: tokens at least as likely as the chosen one, itself included (1 = most likely).
    ranks = (full >= token_lp.unsqueeze(1)).sum(dim=-1)
    top_n = top_lp.shape[1]  # clamped to V

    # float64 holds token ids, ranks and float32 logprobs exactly, so one tensor (and one sync) carries them all.
    per_row = torch.cat(
        [token_lp.double().unsqueeze(1), ranks.double().unsqueeze(1), top_ids.double(), top_lp.double()], dim=1
    )
    flat = torch.cat([tokens.double(), per_row.flatten()]).tolist()

    token_ids = [int(t) for t in flat[:batch]]
    logprobs: list[dict[int, float] | None] = [None] * batch
    ranks_out: list[int | None] = [None] * batch
    width = 2 + 2 * top_n
    for j, i in enumerate(logprob_rows):
        values = flat[batch + j * width : batch + (j + 1) * width]
        n = min(rows[i].params.logprobs, top_n)
        ids = values[2 : 2 + top_n]
        lps = values[2 + top_n :]
        entry = {int(t): lp for t, lp in zip(ids[:n], lps[:n], strict=True)}
        entry[token_ids[i]] = values[0]
        logprobs[i] = entry
        ranks_out[i] = int(values[1])
    return SampleResult(token_ids, logprobs, ranks_out)
