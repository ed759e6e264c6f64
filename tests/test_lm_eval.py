"""lm-eval's `local-completions` model against the server: a loglikelihood task built here (lm-eval's
custom task YAML over a local JSONL file, nothing downloaded), run by the `lm_eval` command line with
`--limit 20`; each of its loglikelihoods must equal a transformers forward pass within 1e-3.

The server runs the default GGUF on the dense fp32 path (`--dtype float32 --quantization none`), the
same dequantized weights transformers loads from the file, so what is compared is the serving path:
lm-eval's remote tokenizer (/tokenizer_info, /tokenize), echo + logprobs on /v1/completions, and the
engine's prompt logprobs."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import gguf_folder_and_file

from kvserve.server.launch import ServerProcess

pytestmark = pytest.mark.slow

LIMIT = 20
TOLERANCE = 1e-3
SUBJECTS = ["The cat", "My brother", "The old train", "A small bird", "Our teacher", "The river"]
VERBS = [" sleeps on the warm", " walks to the", " sings near the", " waits by the"]
PLACES = [" sofa.", " station every morning.", " garden at noon.", " bridge."]

TASK_YAML = """\
task: kvserve_local_loglikelihood
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{continuation}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def write_task(folder: str) -> None:
    docs = [
        {"context": subject + verb, "continuation": place} for subject in SUBJECTS for verb, place in zip(VERBS, PLACES)
    ]
    data = os.path.join(folder, "data.jsonl")
    with open(data, "w") as f:
        f.writelines(json.dumps(doc) + "\n" for doc in docs)
    with open(os.path.join(folder, "kvserve_local.yaml"), "w") as f:
        f.write(TASK_YAML.format(data=data))


def reference_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """What lm-eval asks for, from transformers: its split of the pair into tokens (api/model.py's
    _encode_pair: the whole text encoded, the context's tokens cut off), then the sum of the
    continuation tokens' logprobs."""
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    context_ids = tokenizer.encode(context, add_special_tokens=False)
    with torch.no_grad():
        logits = model(torch.tensor([whole])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return sum(logprobs[i - 1, whole[i]].item() for i in range(len(context_ids), len(whole)))


def test_lm_eval_local_completions_matches_transformers(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    write_task(str(tmp_path))
    server = ServerProcess(["--dtype", "float32", "--quantization", "none", "--served-model-name", "smollm"]).start()
    try:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        env["HF_DATASETS_CACHE"] = str(tmp_path / "datasets")
        model_args = f"base_url={server.url}/v1/completions,model=smollm,num_concurrent=2,max_retries=1"
        command = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", model_args]
        command += ["--tasks", "kvserve_local_loglikelihood", "--include_path", str(tmp_path), "--limit", str(LIMIT)]
        command += ["--output_path", str(tmp_path / "out"), "--log_samples"]
        run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    finally:
        code = server.stop()
    assert code == 0, server.output()[-3000:]

    (samples_file,) = glob.glob(
        str(tmp_path / "out" / "**" / "samples_kvserve_local_loglikelihood_*.jsonl"), recursive=True
    )
    with open(samples_file) as f:
        samples = [json.loads(line) for line in f]
    assert len(samples) == LIMIT

    folder, file = gguf_folder_and_file()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    diffs = []
    for sample in samples:
        context, continuation = sample["arguments"]["gen_args_0"]["arg_0"], sample["arguments"]["gen_args_0"]["arg_1"]
        served, _is_greedy = sample["resps"][0][0]
        expected = reference_loglikelihood(model, tokenizer, context, continuation)
        diffs.append(abs(float(served) - expected))
    assert max(diffs) < TOLERANCE, diffs
