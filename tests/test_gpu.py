"""CUDA paths, compared with Hugging Face on the same GPU in the same dtype. Skipped without a GPU
(CI has none); run them on a GPU machine with `pytest tests/test_gpu.py`."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import gpl_text, hf_greedy, run_cli
from test_evaluate import evaluate, reference_sliding, text_file  # noqa: F401 (a fixture)
from test_fill_mask import assert_same_predictions, fill
from test_generate import PROMPTS, greedy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def hf_greedy_on_cuda(model_dir, prompt: str, new_tokens: int, dtype: torch.dtype) -> list[int]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to("cuda")
    inputs = tokenizer(prompt, return_tensors="pt").to("cuda")
    output = model.generate(**inputs, do_sample=False, max_new_tokens=new_tokens, pad_token_id=tokenizer.eos_token_id)
    new = output[0, inputs["input_ids"].shape[1]:].tolist()
    return new[: new.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in new else new


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("model", ["tiny_gpt2", "tiny_llama"])
def test_greedy_on_cuda_equals_hf_on_cuda(model, dtype, request):
    model_dir = request.getfixturevalue(model)
    [record] = greedy(model_dir, PROMPTS[1], n=20, extra=("--device", "cuda", "--dtype", dtype))
    assert record["token_ids"] == hf_greedy_on_cuda(model_dir, PROMPTS[1], 20, getattr(torch, dtype))


def test_fast_on_cuda_is_a_compiled_static_cache_with_the_same_greedy_tokens(tiny_llama):
    [fast] = greedy(tiny_llama, PROMPTS[1], n=20, extra=("--device", "cuda", "--dtype", "float32", "--fast"))
    assert fast["token_ids"] == hf_greedy_on_cuda(tiny_llama, PROMPTS[1], 20, torch.float32)


def test_default_dtype_on_cuda_is_bfloat16_and_cpu_stays_exact(tiny_gpt2):
    [on_cuda] = greedy(tiny_gpt2, PROMPTS[1], n=20, extra=("--device", "cuda"))
    assert on_cuda["token_ids"] == hf_greedy_on_cuda(tiny_gpt2, PROMPTS[1], 20, torch.bfloat16)
    [on_cpu] = greedy(tiny_gpt2, PROMPTS[1], n=20, extra=("--device", "cpu"))
    assert on_cpu["token_ids"] == hf_greedy(tiny_gpt2, [PROMPTS[1]], 20)[0]


@pytest.mark.parametrize("batch_size", ["1", "8"])
def test_eval_on_cuda_equals_the_float32_reference(tiny_llama, text_file, batch_size):
    record = evaluate(text_file, tiny_llama, "--max-length", "64", "--stride", "32", "--batch-size", batch_size,
                      "--device", "cuda")
    value, tokens = reference_sliding(tiny_llama, 64, 32)  # on the CPU in float32
    assert record["tokens"] == tokens
    assert record["value"] == pytest.approx(value, rel=1e-5)


def test_fill_mask_on_cuda_equals_the_pipeline_on_cuda(tiny_bert):
    from transformers import pipeline

    text = "This License applies to any [MASK] or other work."
    [record] = fill(text, "-m", tiny_bert, "--top-k", "5", "--device", "cuda", "--dtype", "float32")
    reference = pipeline("fill-mask", model=str(tiny_bert), device="cuda")
    assert_same_predictions(record["predictions"], [reference(text, top_k=5)])


def test_finetune_bf16_on_cuda_learns_and_resumes(tiny_gpt2, tmp_path):
    data = tmp_path / "gpl.txt"
    data.write_text(gpl_text()[:20000])
    args = ["--data", data, "-m", tiny_gpt2, "--device", "cuda", "--bf16", "--max-steps", "12", "--max-length", "64",
            "--batch-size", "8", "--lr", "3e-3", "--log-every", "1", "--seed", "0", "--json"]
    straight = run_cli("finetune", *args, "-o", tmp_path / "straight")
    assert straight.exit_code == 0, straight.stderr
    losses = [json.loads(line)["loss"] for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-3:]) < sum(losses[:3])
    run = json.loads((tmp_path / "straight" / "run.json").read_text())
    assert run["resolved"]["device"].startswith("cuda")
    half = run_cli("finetune", *args, "--save-every", "6", "-o", tmp_path / "half")
    assert half.exit_code == 0, half.stderr
    resumed = run_cli("finetune", *args, "-o", tmp_path / "resumed", "--resume",
                      tmp_path / "half" / "checkpoints" / "step-6")
    assert resumed.exit_code == 0, resumed.stderr
    assert "Resuming from" in resumed.stderr
    final = json.loads(resumed.stdout.strip().splitlines()[-1])["final_loss"]
    assert final == pytest.approx(losses[-1], rel=1e-3)  # GPU kernels may add in another order
    # a fresh run would match as well: a checkpoint with nudged weights must end elsewhere
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(tmp_path / "half", tmp_path / "nudged")
    nudged = tmp_path / "nudged" / "checkpoints" / "step-6" / "model.safetensors"
    save_file({k: v + 0.05 for k, v in load_file(str(nudged)).items()}, str(nudged))
    moved = run_cli("finetune", *args, "-o", tmp_path / "moved", "--resume", nudged.parent)
    assert moved.exit_code == 0, moved.stderr
    assert json.loads(moved.stdout.strip().splitlines()[-1])["final_loss"] != pytest.approx(losses[-1], rel=1e-3)
    [generated] = greedy(tmp_path / "straight", PROMPTS[0], n=8, extra=("--device", "cuda"))
    assert generated["generated_tokens"] > 0


def test_more_processes_than_gpus_is_a_clean_error(tiny_gpt2, tmp_path):
    result = run_cli("finetune", "--data", tmp_path / "x.txt", "-m", tiny_gpt2, "--device", "cuda",
                     "--num-processes", str(torch.cuda.device_count() + 1), "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert f"needs {torch.cuda.device_count() + 1} GPUs" in result.stderr
    assert not (tmp_path / "out").exists()
