"""`llmcli eval --tasks` against lm-evaluation-harness's own `hf` model on the same model and tasks, in
the same test: task YAMLs with local data written here (multiple choice with acc and acc_norm,
generate_until with exact_match, loglikelihood_rolling perplexity), every metric and every sample's
answer compared. On the hf engine 1e-6 relative; on the llama.cpp engine, on an F32 GGUF export of the
same model, within LLAMA_RELATIVE."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest

from conftest import GPL3, run_cli

lm_eval = pytest.importorskip("lm_eval")

RELATIVE = 1e-6
# llama.cpp's kernels on the same F32 weights; measured here: a multiple-choice answer's log-likelihood up
# to 2.5e-5 apart, a rolling sum 6.6e-7, the metrics 3.7e-6 (on hf: metrics equal, answers 1.1e-7)
LLAMA_RELATIVE = 1e-4
# the embedded Q4_1 file's weights as F16 on llama.cpp against its float32 conversion on torch: an answer's
# log-likelihood, measured up to 0.016 nats apart over 48 answers (llama.cpp multiplies in F16 and keeps an F16
# KV cache)
EMBEDDED_F16_NATS = 0.05


def paragraphs() -> list[str]:
    text = GPL3.read_text()
    return [" ".join(block.split()) for block in text.split("\n\n") if len(block.split()) > 8]


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    """Three tasks in one folder, each reading a JSONL file beside it."""
    import random

    folder = tmp_path_factory.mktemp("tasks")
    rng = random.Random(0)
    blocks = paragraphs()
    words = " ".join(blocks).split()
    questions = []
    for block in blocks[:24]:
        head = block.split()[:12]
        answer = head[-1]
        choices = [answer] + rng.sample([w for w in words if w != answer], 3)
        rng.shuffle(choices)
        questions.append({"context": " ".join(head[:-1]), "choices": choices, "label": choices.index(answer)})
    write_jsonl(folder / "mc.jsonl", questions)
    write_jsonl(folder / "gen.jsonl", [{"question": " ".join(b.split()[:6]), "answer": b.split()[6]}
                                      for b in blocks[30:42]])
    write_jsonl(folder / "docs.jsonl", [{"text": b} for b in blocks[50:56]] + [{"text": " ".join(blocks[60:66])}])
    common = "dataset_path: json\ntest_split: test\n"
    (folder / "mc.yaml").write_text(
        f"task: license_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n")
    (folder / "gen.yaml").write_text(
        f"task: license_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'gen.jsonl'}\n"
        "output_type: generate_until\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: ['\\n', 'e']\n  max_gen_toks: 12\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    (folder / "docs.yaml").write_text(
        f"task: license_ppl\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'docs.jsonl'}\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")
    return folder


def write_jsonl(path, records) -> None:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def reference(model_dir, folder, **options):
    """lm-eval's own hf model, as `lm_eval --model hf --model_args pretrained=DIR` runs it."""
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model_dir},dtype=float32", device="cpu",
                                   tasks=["license_mc", "license_gen", "license_ppl"], log_samples=True,
                                   task_manager=TaskManager(include_path=str(folder)), **options)


def ours(model, folder, output, *args):
    result = run_cli("eval", "--tasks", str(folder / "mc.yaml"), "--tasks", str(folder / "gen.yaml"), "--tasks",
                     str(folder / "docs.yaml"), "-m", str(model), "--json", "--log-samples", "--output-path",
                     str(output), *args)
    assert result.exit_code == 0, result.stderr
    [results_file] = output.rglob("results_*.json")
    samples = {path.name.split("_", 1)[1].rsplit("_", 1)[0]: [json.loads(line) for line in path.read_text().splitlines()]
               for path in output.rglob("samples_*.jsonl")}
    return result.json_lines(), json.loads(results_file.read_text()), samples


def metrics(results: dict) -> dict[tuple[str, str], float]:
    return {(task, key): value for task, values in results["results"].items() for key, value in values.items()
            if isinstance(value, float) and "stderr" not in key}


def close(a: float, b: float, relative: float) -> bool:
    return math.isclose(a, b, rel_tol=relative, abs_tol=relative)


def answers(samples: list[dict]) -> list:
    """Each request's answer in doc order: (log-likelihood, greedy) pairs, texts or rolling sums."""
    return [response for sample in sorted(samples, key=lambda s: s["doc_id"]) for response in sample["resps"]]


def check_same(got: dict, expected: dict, ours_samples: dict, theirs_samples: dict, relative: float) -> None:
    mine, theirs = metrics(got), metrics(expected)
    assert set(mine) == set(theirs) and len(mine) >= 5, (mine.keys(), theirs.keys())
    for key in theirs:
        assert close(mine[key], theirs[key], relative), (key, mine[key], theirs[key])
    for task in ("license_mc", "license_gen", "license_ppl"):
        for a, b in zip(answers(ours_samples[task]), answers(theirs_samples[task]), strict=True):
            if task == "license_gen":
                assert a == b, (a, b)
            elif task == "license_mc":
                assert close(float(a[0][0]), float(b[0][0]), relative), (a, b)
                # greedy flags: exact on the same arithmetic (the samples file holds them as text)
                assert relative > RELATIVE or str(a[0][1]) == str(b[0][1])
            else:
                assert close(float(a[0]), float(b[0]), relative), (a, b)


def test_tasks_on_the_hf_engine_equal_lm_evals_hf_model(tiny_llama, task_files, tmp_path):
    """Every metric and every per-sample answer equal to lm-eval's hf model (1e-6 relative); the table's
    records carry each metric with its standard error; the results file is lm-eval's own, plus the
    engine, weights and threads."""
    records, results, samples = ours(tiny_llama, task_files, tmp_path / "out", "--engine", "hf")
    expected = reference(tiny_llama, task_files)
    check_same(results, expected, samples, expected["samples"], RELATIVE)
    acc = next(r for r in records if r["task"] == "license_mc" and r["metric"] == "acc")
    assert acc["engine"] == "hf" and acc["stderr"] == pytest.approx(expected["results"]["license_mc"]["acc_stderr,none"])
    assert {"results", "configs", "versions", "n-shot", "higher_is_better", "n-samples", "config",
            "task_hashes"} <= set(results)
    assert results["config"]["llmcli_engine"] == "hf" and results["config"]["llmcli_weights"] == "float32"
    from lm_eval.utils import hash_string

    # the hashes of every document, prompt and target: the same requests as lm-eval's own run made
    assert results["task_hashes"] == {task: hash_string("".join(s["doc_hash"] + s["prompt_hash"] + s["target_hash"]
                                                                for s in done))
                                      for task, done in expected["samples"].items()}
    # batched answers equal one at a time
    _, one_by_one, single = ours(tiny_llama, task_files, tmp_path / "one", "--engine", "hf", "--batch-size", "1")
    check_same(one_by_one, results, single, samples, RELATIVE)


def test_tasks_on_llama_cpp_match_lm_eval_within_the_bound(tiny_llama, task_files, tmp_path):
    """The same tasks on an F32 GGUF export of the same model: within LLAMA_RELATIVE of lm-eval's hf
    model; a question's answers scored together (its context decoded once) equal each scored alone."""
    pytest.importorskip("llama_cpp")
    from llmcli.engines import Window, choose_engine

    gguf = tmp_path / "tiny.gguf"
    exported = run_cli("export", str(tiny_llama), "-o", str(gguf), "--type", "f32")
    assert exported.exit_code == 0, exported.stderr
    records, results, samples = ours(gguf, task_files, tmp_path / "out")
    assert {record["engine"] for record in records} == {"llama.cpp"}
    expected = reference(tiny_llama, task_files)
    check_same(results, expected, samples, expected["samples"], LLAMA_RELATIVE)
    engine = choose_engine(str(gguf), "llama.cpp")
    sequences, starts = [], []
    for question in ("This License applies to", "Everyone is permitted to", "You may convey"):
        context = engine.encode(question)
        for word in (" any", " the program", " verbatim copies of works"):
            sequences.append(context + engine.encode(word, add_special=False))
            starts.append(len(context))
    together = engine.continuation_scores(sequences, starts, 8)  # three questions in one context
    alone = [engine.continuation_scores([s], [t], 1)[0] for s, t in zip(sequences, starts)]
    for (a, greedy_a), (b, greedy_b) in zip(together, alone):
        assert close(a, b, LLAMA_RELATIVE) and greedy_a == greedy_b
    for (value, _), sequence, start in zip(alone, sequences, starts):  # one sequence: llama.cpp's own numbers
        assert close(value, sum(engine.token_logprobs(Window(sequence, len(sequence) - start), 0)[0]), 1e-9)


def test_the_embedded_model_equals_lm_evals_hf_model_on_a_multiple_choice_task(task_files, tmp_path):
    """The hf engine: lm-eval's figures. The default engine, llama.cpp: the embedded Q4_1 file's weights
    as F16 (eval --tasks runs what generate runs), within EMBEDDED_F16_NATS of each answer's
    log-likelihood and with the same accuracy."""
    from lm_eval.tasks import TaskManager

    from llmcli import models

    converted = models.local_model_dir(models.resolve_model(None))
    expected = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={converted},dtype=float32", device="cpu",
                                       tasks=["license_mc"], limit=12, log_samples=True,
                                       task_manager=TaskManager(include_path=str(task_files)))
    theirs = expected["results"]["license_mc"]
    result = run_cli("eval", "--tasks", str(task_files / "mc.yaml"), "--engine", "hf", "--json", "--limit", "12")
    assert result.exit_code == 0, result.stderr
    got = {r["metric"]: r["value"] for r in result.json_lines()}
    assert close(got["acc"], theirs["acc,none"], RELATIVE) and close(got["acc_norm"], theirs["acc_norm,none"],
                                                                     RELATIVE)
    if importlib.util.find_spec("llama_cpp") is None:
        return
    result = run_cli("eval", "--tasks", str(task_files / "mc.yaml"), "--json", "--limit", "12", "--log-samples",
                     "--output-path", str(tmp_path / "llama"))
    assert result.exit_code == 0, result.stderr
    records = result.json_lines()
    assert {(r["engine"], r["weights"]) for r in records} == {("llama.cpp", "F16")}
    assert {r["metric"]: r["value"] for r in records}["acc"] == theirs["acc,none"]
    [samples] = (tmp_path / "llama").rglob("samples_*.jsonl")
    assert samples.parent.name == "SmolLM2-135M-Instruct-embedded"  # nothing a shell must quote
    mine = answers([json.loads(line) for line in samples.read_text().splitlines()])
    apart = [abs(float(a[0][0]) - float(b[0][0])) for a, b in zip(mine, answers(expected["samples"]["license_mc"]),
                                                                  strict=True)]
    assert max(apart) < EMBEDDED_F16_NATS, max(apart)


def task_yaml(path, data: str) -> str:
    """A perplexity task reading `data`: `dataset_path: json` with a local file, or a hub data set's id."""
    source = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n" if data.endswith(".jsonl")
              else f"dataset_path: {data}\n")
    path.write_text(f"task: {path.stem}\n{source}test_split: test\noutput_type: loglikelihood_rolling\n"
                    "doc_to_text: ''\ndoc_to_target: '{{text}}'\nmetric_list:\n  - metric: word_perplexity\n")
    return str(path)


def test_results_folders_are_named_without_what_a_shell_must_quote():
    from llmcli.tasks.benchmark import folder_name

    assert folder_name("SmolLM2-135M-Instruct (embedded)") == "SmolLM2-135M-Instruct-embedded"
    assert folder_name("HuggingFaceTB/SmolLM2-360M") == "HuggingFaceTB__SmolLM2-360M"  # lm-eval's own form
    assert folder_name("my model.Q4_K_M.gguf") == "my-model.Q4_K_M.gguf"


def test_bad_task_requests_are_one_error_each(tmp_path, task_files, tiny_llama):
    broken = tmp_path / "broken.yaml"
    broken.write_text("dataset_path: json\n")
    missing_data = task_yaml(tmp_path / "missing_data.yaml", str(tmp_path / "gone.jsonl"))
    uncached = task_yaml(tmp_path / "uncached.yaml", "llmcli-tests/no-such-dataset")  # HF_HUB_OFFLINE=1 here
    cases = [
        (["--tasks", missing_data], f"data file is missing (Unable to find '{tmp_path / 'gone.jsonl'}')"),
        (["--tasks", uncached], "data set is not in the cache, and HF_HUB_OFFLINE is set"),
        (["--tasks", "no_such_task_anywhere"], "no task 'no_such_task_anywhere'"),
        (["--tasks", str(tmp_path / "missing.yaml")], "no such file"),
        (["--tasks", str(broken)], "has no 'task:' name"),
        (["--tasks", str(task_files / "mc.yaml"), "--data", str(GPL3)], "--data and --tasks"),
        (["--data", str(GPL3), "--limit", "3"], "--limit is for --tasks"),
        (["--tasks", str(task_files / "mc.yaml"), "--stride", "8"], "--stride is for --data"),
        (["--tasks", str(task_files / "mc.yaml"), "--llama-cpp"], "--llama-cpp is for --data"),
        (["--tasks", str(task_files / "mc.yaml"), "--log-samples"], "--log-samples writes the samples"),
        (["--tasks", str(task_files / "mc.yaml"), "--fewshot-as-multiturn"], "--apply-chat-template"),
        ([], "nothing to evaluate"),
    ]
    for args, fragment in cases:
        result = run_cli("eval", "-m", str(tiny_llama), *args)
        assert result.exit_code == 2, (args, result.stderr)
        errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
        assert len(errors) == 1 and fragment in errors[0], (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_a_task_whose_data_cannot_be_fetched_fails_at_once_when_the_hub_is_unreachable(tmp_path, tiny_gguf):
    """No HF_HUB_OFFLINE, and a hub that refuses connections: llmcli finds the hub out of reach with one
    socket check and sets HF_HUB_OFFLINE, so datasets fails at once (OfflineModeIsEnabled) instead of
    retrying for ~30 s; one Error line, exit 2."""
    import os
    import subprocess
    import sys

    uncached = task_yaml(tmp_path / "uncached.yaml", "llmcli-tests/no-such-dataset")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
                                                            "TRANSFORMERS_OFFLINE")}
    env["HF_ENDPOINT"] = "https://127.0.0.1"  # nothing listens on 127.0.0.1:443 here
    run = subprocess.run([sys.executable, "-m", "llmcli", "eval", "--tasks", uncached, "--limit", "2", "-m",
                          str(tiny_gguf)], capture_output=True, text=True, env=env, timeout=300)
    errors = [line for line in run.stderr.splitlines() if line.startswith("Error: ")]
    assert run.returncode == 2 and len(errors) == 1, run.stderr
    assert "not in the cache, and the hub is unreachable" in errors[0]
    assert "OfflineModeIsEnabled" in errors[0]  # datasets was told not to try the network at all


def test_two_processes_a_lora_adapter_and_its_merge(tiny_llama, task_files, tmp_path):
    """--num-processes 2 shares the requests out and gives one process's figures (1e-6 relative); a LoRA
    adapter finetuned on the license scores it better than its base, and as its merged model does; one
    row per model and task metric."""
    tasks = ["--tasks", str(task_files / "mc.yaml"), "--tasks", str(task_files / "docs.yaml"), "--engine", "hf",
             "--json"]
    import subprocess
    import sys

    one = run_cli("eval", "-m", str(tiny_llama), *tasks, "--output-path", str(tmp_path / "one"))
    # the workers write to the process's own stdout, which only a real process captures
    two = subprocess.run([sys.executable, "-m", "llmcli", "eval", "-m", str(tiny_llama), *tasks, "--num-processes",
                          "2", "--output-path", str(tmp_path / "two")], capture_output=True, text=True, timeout=600)
    assert one.exit_code == 0 and two.returncode == 0, one.stderr + two.stderr
    shared = [json.loads(line) for line in two.stdout.splitlines() if line.strip()]
    assert len(one.json_lines()) == len(shared) >= 5 and "Launching 2 processes" in two.stderr
    [alone] = [json.loads(path.read_text())["config"] for path in (tmp_path / "one").rglob("results_*.json")]
    [split] = [json.loads(path.read_text())["config"] for path in (tmp_path / "two").rglob("results_*.json")]
    # each process answered its share (lm-eval pads the smaller share to the larger)
    [total], halves = alone["llmcli_requests_per_process"], split["llmcli_requests_per_process"]
    assert len(halves) == 2 and all(total / 2 <= half <= total / 2 + 4 for half in halves), (total, halves)
    for a, b in zip(one.json_lines(), shared, strict=True):
        assert (a["task"], a["metric"]) == (b["task"], b["metric"]) and close(a["value"], b["value"], RELATIVE), (a, b)
    data = tmp_path / "gpl.txt"
    data.write_text(GPL3.read_text())
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    for output, extra in ((adapter, []), (merged, ["--merge-lora"])):
        trained = run_cli("finetune", "--data", str(data), "-m", str(tiny_llama), "--lora", "--lora-r", "4",
                          "--max-steps", "10", "--max-length", "64", "--batch-size", "8", "--lr", "3e-3",
                          "-o", str(output), *extra)
        assert trained.exit_code == 0, trained.stderr
    rows = run_cli("eval", "-m", str(tiny_llama), "-m", str(adapter), "-m", str(merged), "--tasks",
                   str(task_files / "docs.yaml"), "--json")
    assert rows.exit_code == 0, rows.stderr
    perplexity = {r["model"]: r["value"] for r in rows.json_lines() if r["metric"] == "word_perplexity"}
    base, tuned, folded = (perplexity[str(path)] for path in (tiny_llama, adapter, merged))
    assert tuned < 0.95 * base and close(tuned, folded, 1e-4)


def test_llama_cpp_decodes_each_shared_token_once(tiny_gguf):
    """Pairs that share tokens (an instruction opening every question, as few-shot examples do; a
    question's context before each answer; two answers' first word): every distinct token of their paths
    (a context and its answer but the last token, a target only) is decoded once, and every score is the
    pair's own: llama.cpp's numbers for it alone."""
    pytest.importorskip("llama_cpp")
    from llmcli.engines import Window, choose_engine
    from llmcli.engines.llama_scoring import AnswerScorer

    engine = choose_engine(str(tiny_gguf), "llama.cpp")
    opening = engine.encode("Answer with the word that ends each line of the license.\n\n")
    pairs = []
    for question in ("This License applies to", "Everyone is permitted to", "You may convey", "You may"):
        context = opening + engine.encode(question, add_special=False)
        for word in (" any", " the program", " the work", " verbatim copies of works", " any"):
            pairs.append((context, engine.encode(word, add_special=False)))
    scorer = AnswerScorer(engine)
    together = scorer.score_answers(pairs)
    paths = {tuple(context + answer[:-1]) for context, answer in pairs}
    assert scorer.decoded == len({path[:end] for path in paths for end in range(1, len(path) + 1)})
    assert scorer.decoded < sum(len(context) + len(answer) - 1 for context, answer in pairs) / 4
    for (context, answer), (value, _) in zip(pairs, together):  # llama.cpp's own numbers, one sequence
        alone = sum(engine.token_logprobs(Window(context + answer, len(answer)), 0)[0])
        assert close(value, alone, LLAMA_RELATIVE)


@pytest.mark.parametrize("model, engine_name", [("tiny_llama", "hf"), ("tiny_gguf", "llama.cpp")])
def test_an_answer_is_greedy_exactly_when_each_of_its_tokens_is_the_likeliest(model, engine_name, request):
    """lm-eval's is_greedy: the model's own greedy continuation is greedy; the same with its second
    token swapped is not, though its first token still is."""
    if engine_name == "llama.cpp":
        pytest.importorskip("llama_cpp")
    from llmcli.data import Prompt
    from llmcli.engines import choose_engine
    from llmcli.tasks.generate import GenerateOptions, generate

    engine = choose_engine(str(request.getfixturevalue(model)), engine_name)
    context = engine.encode("This License applies to")
    [greedy] = generate(engine, [Prompt(ids=context)], GenerateOptions(max_new_tokens=3, chat=False))
    own = list(greedy.token_ids)
    assert len(own) == 3
    swapped = [own[0], (own[1] + 1) % 100 + 10, own[2]]
    scores = engine.continuation_scores([context + own, context + swapped, context + own[:1]], [len(context)] * 3, 8)
    assert [greedy for _, greedy in scores] == [True, False, True], scores


def test_chat_template_and_few_shot_turns_equal_lm_evals(tiny_llama, task_files, tmp_path):
    """--apply-chat-template with --num-fewshot and --fewshot-as-multiturn: the prompts lm-eval renders
    through the model's template (the same task hashes) and the same answers as its hf model."""
    from lm_eval.tasks import TaskManager

    output = tmp_path / "out"
    result = run_cli("eval", "--tasks", str(task_files / "mc.yaml"), "--tasks", str(task_files / "gen.yaml"), "-m",
                     str(tiny_llama), "--engine", "hf", "--apply-chat-template", "--fewshot-as-multiturn",
                     "--num-fewshot", "2", "--log-samples", "--output-path", str(output), "--json")
    assert result.exit_code == 0, result.stderr
    [results_file] = output.rglob("results_*.json")
    got = json.loads(results_file.read_text())
    expected = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={tiny_llama},dtype=float32", device="cpu",
                                       tasks=["license_mc", "license_gen"], num_fewshot=2, apply_chat_template=True,
                                       fewshot_as_multiturn=True, log_samples=True,
                                       task_manager=TaskManager(include_path=str(task_files)))
    # each request's context, as lm-eval rendered it (its samples file keeps them as gen_args_N.arg_0)
    prompts = {task: [[request[0] for request in s["arguments"]] for s in sorted(done, key=lambda s: s["doc_id"])]
               for task, done in expected["samples"].items()}
    samples = {path.name.split("_", 1)[1].rsplit("_", 1)[0]: [json.loads(line) for line in path.read_text().splitlines()]
               for path in output.rglob("samples_*.jsonl")}
    assert prompts["license_mc"][0][0].count("<|assistant|>") == 3  # two examples as turns, then the question
    for task in ("license_mc", "license_gen"):
        mine = [[request["arg_0"] for request in s["arguments"].values()]
                for s in sorted(samples[task], key=lambda s: s["doc_id"])]
        assert mine == prompts[task]
    for key, value in metrics(expected).items():
        assert close(metrics(got)[key], value, RELATIVE), key
