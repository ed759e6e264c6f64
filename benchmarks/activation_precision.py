"""What rounding the activations to int8 would cost in accuracy (the one change of arithmetic that
would double the integer products' rate: VNNI's dpbusd takes 64 int8 multiply-adds an instruction,
dpwssd 32 int16 ones). The default model on the plain fp32 path (`quantization="none"`, no kernels),
over tests/test_quantized_model.py's 1,000-token text, with the input of chosen products rounded per
block of 32 to `levels` steps each side of zero (127: int8, llama.cpp's Q8 scheme; 32767: int16, what
the kernels do), against the unrounded model: top-1 agreement at every position and perplexity, the
two figures issue 15's test holds to >= 99% and within 0.5%.

    python benchmarks/activation_precision.py [--levels 127 32767] [--asymmetric]

Only the activations are rounded, so the figures isolate their share (the Q4_1 weights are the same
fp32 values on both sides).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

os.environ["KVSERVE_CPU_KERNELS"] = "0"  # the plain PyTorch path: each product's input can be rounded first
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from test_quantized_model import NUM_TOKENS, TEXT, score  # noqa: E402  (the test's text and scoring)

from kvserve import LLM  # noqa: E402
from kvserve.models.layers import Linear  # noqa: E402

PRODUCT_SETS = [
    ("all five", ["qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head"]),
    ("the layers' four", ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
    ("QKV, O, gate/up", ["qkv_proj", "o_proj", "gate_up_proj"]),
    ("down", ["down_proj"]),
    ("LM head", ["lm_head"]),
]


def rounded(x: torch.Tensor, levels: int) -> torch.Tensor:
    """x rounded per block of 32 (along the last dimension) to `levels` steps of max|x| / levels."""
    blocks = x.reshape(-1, 32)
    step = blocks.abs().amax(-1, keepdim=True) / levels
    codes = torch.where(step > 0, (blocks / step.clamp_min(torch.finfo(x.dtype).tiny)).round(), 0.0)
    return (codes * step).reshape(x.shape)


def rounded_asymmetric(x: torch.Tensor, levels: int) -> torch.Tensor:
    """x rounded per block of 32 to `levels` steps from the block's min to its max (unsigned codes,
    one offset a block): half the step of the symmetric scheme where a block's outlier is one-sided."""
    blocks = x.reshape(-1, 32)
    low, high = blocks.amin(-1, keepdim=True), blocks.amax(-1, keepdim=True)
    step = (high - low) / levels
    codes = torch.where(step > 0, ((blocks - low) / step.clamp_min(torch.finfo(x.dtype).tiny)).round(), 0.0)
    return (low + codes * step).reshape(x.shape)


def rounding_input(forward, levels: int, asymmetric: bool):
    """forward, with its input rounded first."""
    if asymmetric:
        return lambda x, *args, **kwargs: forward(rounded_asymmetric(x, 2 * levels + 1), *args, **kwargs)
    return lambda x, *args, **kwargs: forward(rounded(x, levels), *args, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", type=int, nargs="+", default=[127, 32767])
    parser.add_argument(
        "--asymmetric", action="store_true", help="2 x levels + 1 unsigned steps from each block's min (127: uint8)"
    )
    args = parser.parse_args()
    llm = LLM(quantization="none", kv_cache_memory="128MiB", enable_prefix_caching=False)
    with open(TEXT) as f:
        ids = llm.tokenizer.encode(f.read())[:NUM_TOKENS]
    _, ref_top1, ref_ppl = score(llm, ids)
    linears = [(name.rsplit(".", 1)[-1], m) for name, m in llm.engine.runner.model.named_modules()]
    linears = [(kind, m) for kind, m in linears if isinstance(m, Linear)]
    print(f"unrounded: perplexity {ref_ppl:.4f}")
    for levels in args.levels:
        for label, kinds in PRODUCT_SETS:
            patched = [m for kind, m in linears if kind in kinds]
            for m in patched:  # an instance attribute shadows the class's forward
                m.forward = rounding_input(m.forward, levels, args.asymmetric)
            try:
                _, top1, ppl = score(llm, ids)
            finally:
                for m in patched:
                    del m.forward
            agreement = sum(a == b for a, b in zip(top1, ref_top1)) / len(top1)
            print(
                f"levels {levels:5d}, {label:>16}: top-1 agreement {agreement:.1%}, "
                f"perplexity {ppl:.4f} ({ppl / ref_ppl - 1:+.3%})",
                flush=True,
            )


if __name__ == "__main__":
    main()
