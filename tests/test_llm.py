"""The offline API end to end on the default model: sampling controls, stops, n > 1, logprobs, errors."""

from __future__ import annotations

import math

import pytest

from kvserve import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm():
    return LLM(kv_cache_memory="128MiB")


@pytest.fixture(autouse=True)
def no_leaks(llm):
    yield
    llm.engine.check_idle()


PROMPT = "Write a short story about a robot who learns to paint."


def chat_ids(llm, text=PROMPT):
    return llm.tokenizer.apply_chat_template([{"role": "user", "content": text}])


def test_seed_reproduces_whatever_the_batch(llm):
    params = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=16, seed=1234, ignore_eos=True)
    alone = llm.generate([chat_ids(llm)], params)[0].outputs[0].token_ids
    again = llm.generate([chat_ids(llm)], params)[0].outputs[0].token_ids
    others = SamplingParams(temperature=0.8, max_tokens=16, ignore_eos=True)
    batch = llm.generate(
        [chat_ids(llm, "Hello"), chat_ids(llm), chat_ids(llm, "Tell me a joke")], [others, params, others]
    )
    assert alone == again == batch[1].outputs[0].token_ids
    other_seed = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=16, seed=99, ignore_eos=True)
    assert llm.generate([chat_ids(llm)], other_seed)[0].outputs[0].token_ids != alone


def test_top_k_1_equals_greedy(llm):
    greedy = llm.generate([chat_ids(llm)], SamplingParams(temperature=0, max_tokens=20))[0].outputs[0]
    top1 = llm.generate([chat_ids(llm)], SamplingParams(temperature=1.3, top_k=1, max_tokens=20))[0].outputs[0]
    assert top1.token_ids == greedy.token_ids


def test_stop_string_cuts_text_across_token_boundaries(llm):
    base = llm.generate([chat_ids(llm)], SamplingParams(temperature=0, max_tokens=40))[0].outputs[0]
    text = base.text
    assert len(text) > 30
    stop = text[20:27]  # 7 characters from the middle, almost surely spanning tokens
    out = llm.generate([chat_ids(llm)], SamplingParams(temperature=0, max_tokens=40, stop=[stop]))[0].outputs[0]
    assert out.text == text[: text.index(stop)]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    kept = SamplingParams(temperature=0, max_tokens=40, stop=[stop], include_stop_str_in_output=True)
    assert llm.generate([chat_ids(llm)], kept)[0].outputs[0].text == text[: text.index(stop) + len(stop)]


def test_stop_token_ids_and_length_finish(llm):
    base = llm.generate([chat_ids(llm)], SamplingParams(temperature=0, max_tokens=10))[0].outputs[0]
    assert base.finish_reason == "length" and len(base.token_ids) == 10
    stop_id = base.token_ids[4]
    first = base.token_ids.index(stop_id)
    out = llm.generate([chat_ids(llm)], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop_id]))
    out = out[0].outputs[0]
    assert out.token_ids == base.token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id


def test_eos_stops_unless_ignored(llm):
    out = llm.generate(["Why is the sky blue?"], SamplingParams(temperature=0, max_tokens=8))[0].outputs[0]
    assert out.token_ids[-1] in llm.engine.eos_token_ids and out.finish_reason == "stop"
    ignored = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    assert len(llm.generate(["Why is the sky blue?"], ignored)[0].outputs[0].token_ids) == 8
    at_least = SamplingParams(temperature=0, max_tokens=8, min_tokens=5)
    out = llm.generate(["Why is the sky blue?"], at_least)[0].outputs[0]
    assert len(out.token_ids) >= 5 and not set(out.token_ids[:5]) & llm.engine.eos_token_ids


def test_parallel_samples_share_prompt_blocks(llm):
    engine = llm.engine
    prompt = chat_ids(llm)  # not block-aligned: the partial last block is copied per sample
    params = SamplingParams(n=4, temperature=1.0, max_tokens=6, seed=7, ignore_eos=True)
    request_id = engine.add_request(prompt, params)
    while not engine.groups[request_id].sequences[0].output_token_ids:
        engine.step()
    seqs = engine.groups[request_id].sequences
    num_full = len(prompt) // engine.kv.block_size
    tables = [engine.kv.block_tables[f"{request_id}#{s.index}"] for s in seqs]
    assert all(t[:num_full] == tables[0][:num_full] for t in tables)  # the same Block objects
    assert all(b.ref_count == 4 for b in tables[0][:num_full])
    assert len({t[num_full].block_id for t in tables}) == 4  # each its own copy of the partial block
    while not engine.is_finished(request_id):
        engine.step()
    out = engine.pop_finished(request_id)
    assert [len(o.token_ids) for o in out.outputs] == [6, 6, 6, 6]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1  # different samples
    # greedy parallel samples are all the greedy answer
    greedy = llm.generate([prompt], SamplingParams(n=3, temperature=0, max_tokens=8))[0]
    alone = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8))[0].outputs[0].token_ids
    assert [o.token_ids for o in greedy.outputs] == [alone] * 3


def test_logprobs_and_prompt_logprobs_agree(llm):
    prompt = llm.tokenizer.encode("The capital of France is")
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4, logprobs=3, ignore_eos=True))[0]
    generated = out.outputs[0]
    for token, entry in zip(generated.token_ids, generated.logprobs):
        assert token in entry and 3 <= len(entry) <= 4
        assert entry[token] == max(entry.values())  # greedy picks the most likely
        assert all(v <= 0 for v in entry.values())
    # scoring prompt + continuation (echo, max_tokens=0) gives the same logprobs for the continuation
    scored = llm.generate([prompt + generated.token_ids], SamplingParams(max_tokens=0, prompt_logprobs=1))[0]
    assert scored.outputs[0].token_ids == [] and scored.prompt_logprobs[0] is None
    assert len(scored.prompt_logprobs) == len(prompt) + 4
    for i, token in enumerate(generated.token_ids):
        assert math.isclose(scored.prompt_logprobs[len(prompt) + i][token], generated.logprobs[i][token], abs_tol=1e-3)


def test_chat_and_text_prompts(llm):
    out = llm.chat([{"role": "user", "content": "Say hello."}], SamplingParams(temperature=0, max_tokens=12))
    assert out[0].outputs[0].text.strip()
    outs = llm.generate(["One", "Two"], SamplingParams(temperature=0, max_tokens=3))
    assert [o.prompt for o in outs] == ["One", "Two"]
    # continue_final_message: the prefilled assistant answer is continued, not closed
    messages = [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is"},
    ]
    params = SamplingParams(temperature=0, max_tokens=3)
    out = llm.chat(messages, params, add_generation_prompt=False, continue_final_message=True)[0]
    rendered = llm.tokenizer.decode(out.prompt_token_ids, skip_special_tokens=False)
    assert rendered.endswith("<|im_start|>assistant\nThe capital of France is")
    assert out.outputs[0].text.startswith(" Paris")
    with pytest.raises(ValueError, match="cannot both be true"):
        llm.chat(messages, params, continue_final_message=True)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -1},
        {"top_p": 0},
        {"top_p": 1.5},
        {"n": 0},
        {"logprobs": 21},
        {"max_tokens": -1},
        {"min_p": 2},
        {"repetition_penalty": 0},
        {"min_tokens": 5, "max_tokens": 2},
        {"stop": [""]},
    ],
)
def test_bad_sampling_params_raise(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_bad_prompts_raise_and_queue_nothing(llm):
    max_len = llm.engine.config.max_model_len
    with pytest.raises(ValueError, match="maximum context length"):
        llm.generate([[5] * (max_len + 1)])
    with pytest.raises(ValueError, match="maximum context length"):
        llm.generate([[5] * 10], SamplingParams(max_tokens=max_len))
    with pytest.raises(ValueError, match="token ids"):
        llm.generate([[5, 10**9]])
    with pytest.raises(ValueError, match="empty"):
        llm.generate([""])
    with pytest.raises(ValueError, match="token ids"):  # the good first prompt must not stay queued
        llm.generate([[5, 6], [-1]])
    assert not llm.engine.has_unfinished()


def test_abort_frees_blocks(llm):
    engine = llm.engine
    request_id = engine.add_request(chat_ids(llm), SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    engine.step()
    assert engine.kv.pool.num_free_blocks < engine.kv.pool.num_blocks
    engine.abort(request_id)
    assert not engine.has_unfinished()  # check_idle runs after the test


def test_chat_template_engine_option():
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    llm = LLM(kv_cache_memory="16MiB", chat_template=template)
    out = llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=1), add_generation_prompt=False)
    assert out[0].prompt_token_ids == llm.engine.tokenizer.encode("[user] Hi\n", add_special_tokens=False)
    with pytest.raises(ValueError, match="no such file"):
        LLM(kv_cache_memory="16MiB", chat_template="/nonexistent/template.jinja")
