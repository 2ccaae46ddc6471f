"""Break one feature at a time in a clean copy of the code and check that the tests of that feature fail.

    .venv/bin/python tests/mutation_check.py            # every recorded breakage (`make mutants`)
    .venv/bin/python tests/mutation_check.py --list     # their names
    .venv/bin/python tests/mutation_check.py NAME ...   # some of them
    .venv/bin/python tests/mutation_check.py --tests-from REV   # against an older commit's tests

Each breakage (a "mutant") replaces one exact piece of the source with a broken version, in a copy of
the working tree made in a temporary directory, and runs the tests named for it there. A mutant whose
tests still pass "survived": the suite would not notice that feature breaking. The copy comes first on
PYTHONPATH, so in-process tests and the `python -m llmcli` subprocesses they start both import it.
Not run by CI (about 7 minutes on 2 cores); rerun it after moving code, and record new breakages here.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Mutant:
    name: str
    path: str  # file to break, relative to the repository root
    original: str  # exact text, found once in the file
    broken: str
    tests: str  # pytest arguments selecting the tests that must fail


MUTANTS = [
    Mutant("chat history forgotten", "llmcli/tasks/chat.py",
           'self.history.append({"role": "assistant", "content": reply.text})', "self.history.clear()",
           "tests/test_generate.py -k chat"),
    Mutant("resume into a new directory ignores the checkpoint", "llmcli/tasks/finetune_loop.py",
           "    if resume_from is not None:\n",
           "    if resume_from is not None and checkpoints.run_dir(resume_from).resolve() == output.resolve():\n",
           "tests/test_finetune.py -k resume_another"),
    Mutant("batch without attention mask", "llmcli/engines/hf.py",
           "output = model.generate(**inputs, **sampling_kwargs(options)",
           'output = model.generate(input_ids=inputs["input_ids"], **sampling_kwargs(options)',
           "tests/test_generate.py -k batched"),
    Mutant("prompt reduced to its last token", "llmcli/tasks/generate.py",
           "return engine.encode(prompt.text)", "return engine.encode(prompt.text)[-1:]",
           "tests/test_generate.py -k greedy_equals"),
    Mutant("prompts read from a file keep their last word", "llmcli/data.py",
           "    return Prompt(text=prompt)\n", "    return Prompt(text=prompt.split()[-1])\n",
           "tests/test_generate.py -k stdin_and_file"),
    Mutant("prompts read from stdin keep their last word", "llmcli/data.py",
           "return [Prompt(text=line) for _, line in lines]", "return [Prompt(text=line.split()[-1]) for _, line in lines]",
           "tests/test_generate.py -k stdin_and_file"),
    Mutant("--fast does nothing on the CPU", "llmcli/engines/__init__.py",
           'weights = "bfloat16" if fast and not on_cuda else dtype', "weights = dtype",
           "tests/test_generate.py -k fast_mode"),
    Mutant("stop string cuts everything", "llmcli/tasks/generate.py",
           'return text[:stop_at], body[:kept], "stop"', 'return "", body[:kept], "stop"',
           "tests/test_generate.py -k stop_string"),
    Mutant("EOS keeps only the first token", "llmcli/tasks/generate.py",
           'return text, ids[: eos_at + 1], "eos"', 'return text, ids[:1], "eos"',
           "tests/test_generate.py -k eos_ends"),
    Mutant("--truncate left keeps the start", "llmcli/tasks/generate.py",
           "return ids[overflow:]", "return ids[:len(ids) - overflow]",
           "tests/test_errors.py -k truncated_left"),
    Mutant("top-k ignored", "llmcli/engines/hf.py",
           'for name in ("top_k", "top_p", "min_p"):', 'for name in ("top_p", "min_p"):',
           "tests/test_generate.py -k sampling_options"),
    Mutant("min-p ignored", "llmcli/engines/hf.py",
           'for name in ("top_k", "top_p", "min_p"):', 'for name in ("top_k", "top_p"):',
           "tests/test_generate.py -k sampling_options"),
    Mutant("repetition penalty ignored", "llmcli/engines/hf.py",
           'kwargs["repetition_penalty"] = options.repetition_penalty', "pass",
           "tests/test_generate.py -k sampling_options"),
    Mutant("static cache ignored", "llmcli/engines/hf.py",
           'decoding["cache_implementation"] = "static"', "pass",
           "tests/test_generate.py -k static_cache"),
    Mutant("prompt lookup ignored", "llmcli/engines/hf.py",
           'kwargs["prompt_lookup_num_tokens"] = options.prompt_lookup', "pass",
           "tests/test_generate.py -k assisted"),
    Mutant("draft model ignored", "llmcli/engines/hf.py",
           "decoding = assisted_kwargs(self.loaded, self.draft)", "decoding = {}",
           "tests/test_generate.py -k assisted"),
    Mutant("LoRA learns nothing (lr 0)", "llmcli/tasks/finetune_loop.py",
           "return torch.optim.AdamW(groups, lr=options.lr, fused=True)",
           "return torch.optim.AdamW(groups, lr=0.0 if options.lora else options.lr, fused=True)",
           "tests/test_finetune.py -k lora_adapter_and_merge"),
    Mutant("--lora-targets ignored", "llmcli/tasks/finetune.py",
           'if targets != "all-linear":', "if False:",
           "tests/test_finetune.py -k lora_targets"),
    Mutant("DDP ranks read the same batches", "llmcli/tasks/finetune_loop.py",
           "order[s * per_step + rank * batch_size: s * per_step + (rank + 1) * batch_size]",
           "order[s * per_step: s * per_step + batch_size]",
           "tests/test_finetune.py -k ddp"),
    Mutant("accumulated loss not divided", "llmcli/tasks/finetune_loop.py",
           "loss = model(**batch, **forward_extra).loss / options.grad_accum",
           "loss = model(**batch, **forward_extra).loss",
           "tests/test_finetune.py -k grad_accumulation"),
    Mutant("--grad-checkpointing ignored", "llmcli/tasks/finetune_loop.py",
           "model.gradient_checkpointing_enable()", "pass",
           "tests/test_finetune.py -k gradient_checkpointing"),
    Mutant("--bf16 runs in full precision", "llmcli/tasks/finetune_loop.py",
           "mixed_precision=options.mixed_precision)", 'mixed_precision="no")',
           "tests/test_finetune.py -k bf16"),
    Mutant("--resume accepts changed options", "llmcli/tasks/finetune.py",
           "    if changed:\n", "    if False:\n",
           "tests/test_finetune.py -k refuses_changed"),
    Mutant("--keep-checkpoints keeps one too many", "llmcli/checkpoints.py",
           "for old in checkpoint_dirs(output)[:-keep]:", "for old in checkpoint_dirs(output)[:-keep - 1]:",
           "tests/test_finetune.py -k keep_checkpoints"),
    Mutant("--line-by-line ignored", "llmcli/data.py",
           "blocks = text.splitlines() if line_by_line else", "blocks = text.splitlines() if False else",
           "tests/test_finetune.py -k every_text_format"),
    Mutant("--text-column reads the first column", "llmcli/data.py",
           "value = row[text_column]", "value = row[reader.fieldnames[0]]",
           "tests/test_finetune.py -k every_text_format"),
    Mutant("--data-eval ignored", "llmcli/tasks/finetune.py",
           "    if options.data_eval:\n", "    if False:\n",
           "tests/test_finetune.py -k data_eval"),
    Mutant("--warmup ignored", "llmcli/tasks/finetune_loop.py",
           "warmup = int(options.warmup * steps) if options.warmup < 1 else int(options.warmup)", "warmup = 0",
           "tests/test_finetune.py -k scheduler_and_warmup"),
    Mutant("--scheduler ignored", "llmcli/tasks/finetune_loop.py",
           "get_scheduler(options.scheduler, optimizer", 'get_scheduler("linear", optimizer',
           "tests/test_finetune.py -k scheduler_and_warmup"),
    Mutant("weight decay on biases and norms too", "llmcli/tasks/finetune_loop.py",
           "(no_decay if parameter.ndim < 2 else decay).append(parameter)", "decay.append(parameter)",
           "tests/test_finetune.py -k weight_decay"),
    Mutant("gradient clipping ignored", "llmcli/tasks/finetune_loop.py",
           "            if options.max_grad_norm > 0:\n", "            if False:\n",
           "tests/test_finetune.py -k max_grad_norm"),
    Mutant("--epochs counted as one", "llmcli/tasks/finetune_loop.py",
           "math.ceil(options.epochs * steps_per_epoch)", "math.ceil(steps_per_epoch)",
           "tests/test_finetune.py -k epochs_set"),
    Mutant("prompt not masked by default", "llmcli/tasks/finetune_loop.py",
           'else data_format != "text"', "else False",
           "tests/test_finetune.py -k masks_the_prompt_by_default"),
    Mutant("interrupt acted on mid-step", "llmcli/tasks/finetune_loop.py",
           "            self.previous = {s: signal.signal(s, self.request) for s in self.SIGNALS}",
           "            self.previous = {}",
           "tests/test_finetune.py -k interrupt_saves"),
    Mutant("causal rescoring scores each token as predicting itself", "llmcli/tasks/fill_mask.py",
           "logprobs.gather(-1, ids[:, 1:, None])", "logprobs.gather(-1, ids[:, :-1, None])",
           "tests/test_fill_mask.py -k causal_rescoring"),
    Mutant("masked accuracy compares with the masked input", "llmcli/tasks/evaluate.py",
           "== chunk[masked]).sum())", "== inputs[masked]).sum())",
           "tests/test_evaluate.py -k masked_accuracy"),
    Mutant("llama.cpp protocol never puts the BOS first", "llmcli/tasks/evaluate.py",
           "        if bos is not None:\n            chunk = [bos] + chunk[1:]", "        pass",
           "tests/test_evaluate.py -k llama_cpp_layout"),
    Mutant("lm-eval rolling windows start from EOS", "llmcli/tasks/evaluate.py",
           "prefix = engine.bos_id if engine.bos_id is not None else engine.eos_id",
           "prefix = engine.eos_id",
           "tests/test_evaluate.py -k lm_eval_figure"),
    Mutant("NO_COLOR ignored", "llmcli/render.py",
           "stderr = Console(stderr=True, highlight=False)", "stderr = Console(stderr=True, highlight=False, no_color=False)",
           "tests/test_errors.py -k no_color"),
    Mutant("remote code always trusted", "llmcli/models.py",
           "config = AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)",
           "config = AutoConfig.from_pretrained(location, trust_remote_code=True)",
           "tests/test_errors.py -k remote_code"),
    Mutant("looking up the GGUF cache creates the entry", "llmcli/models.py",
           '    return cache_root() / "gguf" / f"{gguf_path.stem}-{digest.hexdigest()[:16]}-v{CACHE_FORMAT}"\n',
           '    entry = cache_root() / "gguf" / f"{gguf_path.stem}-{digest.hexdigest()[:16]}-v{CACHE_FORMAT}"\n'
           "    entry.mkdir(parents=True, exist_ok=True)\n    return entry\n",
           "tests/test_errors.py -k cut"),
    Mutant("a damaged GGUF is announced as converting", "llmcli/engines/__init__.py",
           "            models.read_gguf_metadata(Path(source.location))", "            pass",
           "tests/test_errors.py -k cut"),
    Mutant("llama.cpp: top-k ignored", "llmcli/engines/llamacpp.py",
           "            if top_k > 0:", "            if False:",
           "tests/test_llamacpp.py -k sampling_controls"),
    Mutant("llama.cpp: repetition penalty ignored", "llmcli/engines/llamacpp.py",
           "if options.repetition_penalty is not None and options.repetition_penalty != 1:", "if False:",
           "tests/test_llamacpp.py -k sampling_controls"),
    Mutant("llama.cpp: --seed ignored", "llmcli/engines/llamacpp.py",
           "seed = lib.LLAMA_DEFAULT_SEED if self.seed is None else (self.seed + self.sequences) % 2**32",
           "seed = lib.LLAMA_DEFAULT_SEED",
           "tests/test_llamacpp.py -k sampling_controls"),
    Mutant("llama.cpp: every sequence gets the same seed", "llmcli/engines/llamacpp.py",
           "            self.sequences += 1\n", "",
           "tests/test_llamacpp.py -k sampling_controls"),
    Mutant("llama.cpp: decoding runs past a stop string", "llmcli/engines/llamacpp.py",
           " or should_stop():", ":",
           "tests/test_llamacpp.py -k stops_when_asked"),
    Mutant("llama.cpp: --threads ignored", "llmcli/engines/llamacpp.py",
           "params.n_threads = params.n_threads_batch = self.threads", "params.n_threads = params.n_threads_batch = 2",
           "tests/test_llamacpp.py -k stops_when_asked"),
    Mutant("llama.cpp: no context limit from the model", "llmcli/engines/llamacpp.py",
           "self.context_length = lib.llama_model_n_ctx_train(self.model) or None", "self.context_length = None",
           "tests/test_llamacpp.py -k context_on_llama"),
    Mutant("llama.cpp: eval scores the wrong positions", "llmcli/engines/llamacpp.py",
           "                chosen.append(float(logprobs[window.ids[i + 1]]))",
           "                chosen.append(float(logprobs[window.ids[min(i + 2, len(window.ids) - 1)]]))",
           "tests/test_llamacpp.py -k bare_llama_cpp_forward"),
    Mutant("llama.cpp: chat template without the generation prompt", "llmcli/engines/chat_template.py",
           "add_generation_prompt: bool = True", "add_generation_prompt: bool = False",
           "tests/test_llamacpp.py -k chat_formatting"),
    Mutant("llama.cpp: default weights are the quantized file", "llmcli/engines/llamacpp.py",
           '        if weights == "default":', "        if False:",
           "tests/test_llamacpp.py -k embedded_model"),
    Mutant("llama.cpp: a chat decodes the whole conversation again", "llmcli/engines/llamacpp.py",
           "shared = self.use_context(len(prompt) + options.max_new_tokens, keep=shared)",
           "shared = self.use_context(len(prompt) + options.max_new_tokens, keep=0)",
           "tests/test_llamacpp.py -k chat_reuses"),
    Mutant("auto engine never picks llama.cpp", "llmcli/engines/__init__.py",
           'return "llama.cpp" if source.kind == "gguf" and not hf_only and llama_cpp_installed() else "hf"',
           'return "hf"',
           "tests/test_llamacpp.py -k auto_engine"),
    Mutant("a character cut by the token limit shows as U+FFFD", "llmcli/tasks/generate.py",
           'text = decode(body).rstrip("\\ufffd")', "text = decode(body)",
           "tests/test_generate.py -k cut_by_the_token_limit"),
    Mutant("a closed stdout pipe exits 1", "llmcli/render.py",
           "    stdout.write(text)\n    stdout.flush()", "    sys.stdout.write(text)\n    sys.stdout.flush()",
           "tests/test_errors.py -k closed_pipe"),
    Mutant("a target the vocabulary lacks scores as [UNK]", "llmcli/tasks/fill_mask.py",
           "        if pieces[0] == tokenizer.unk_token_id:", "        if False:",
           "tests/test_errors.py -k targets"),
    Mutant("a default --max-new-tokens is not capped to the context", "llmcli/tasks/generate.py",
           "    if not options.default_length or not context or not encoded:", "    if True:",
           "tests/test_generate.py -k capped"),
    Mutant("--per-record scores the records joined", "llmcli/cli/evaluate.py",
           "        text = records if per_record or completions else", "        text = records if completions else",
           "tests/test_evaluate.py -k per_record"),
    Mutant("word blanks filled with punctuation", "llmcli/tasks/fill_mask.py",
           "and word[:1].isalnum()", "and bool(word)",
           "tests/test_fill_mask.py -k punctuation"),
    Mutant("causal blank candidates from the left context only", "llmcli/tasks/fill_mask.py",
           "dict.fromkeys(from_left + from_sentence)", "dict.fromkeys(from_left)",
           "tests/test_fill_mask.py -k at_the_start"),
    Mutant("results of several processes gathered out of order", "llmcli/distributed.py",
           "        return gather_object(local)  # each rank's list, concatenated in rank order",
           "        return list(reversed(gather_object(local)))",
           "tests/test_distributed.py -k two_processes_equals_one"),
    Mutant("a crashed worker reported as the one torchrun stopped", "llmcli/distributed.py",
           "key=lambda item: (item[1] == -signal.SIGTERM, item[0])", "key=lambda item: item[0]",
           "tests/test_distributed.py -k crashed"),
    Mutant("a share of the prompts on another process samples from the first prompt's seed", "llmcli/cli/generate.py",
           "share_options(options, share[0][0])", "options",
           "tests/test_distributed.py -k seeded_sampling"),
    Mutant("seeded once for all batches, not per batch", "llmcli/tasks/generate.py",
           "engine.set_seed((options.seed + start * options.num_return_sequences) % SEEDS)",
           "engine.set_seed(options.seed) if start == 0 else None",
           "tests/test_distributed.py -k seeded_sampling"),
    Mutant("every worker prints its own error", "llmcli/distributed.py",
           "    folder = os.environ.get(ERRORS_DIR_ENV)\n", "    folder = None\n",
           "tests/test_distributed.py -k failing_worker"),
    Mutant("a multi-process checkpoint keeps only rank 0's RNG states", "llmcli/tasks/finetune_loop.py",
           "            rank_rngs = gather_object(rank_rngs)", "            rank_rngs = rank_rngs",
           "tests/test_distributed.py -k stopped_on_two"),
    Mutant("--device-map ignored", "llmcli/models.py",
           "**(placed_kwargs(placement) if placement else {})", "**({})",
           "tests/test_distributed.py -k offload"),
    Mutant("--fsdp accepted on the CPU", "llmcli/cli/finetune.py",
           "    if fsdp:\n        check_fsdp(device)\n", "",
           "tests/test_errors.py -k fsdp"),
    Mutant("a server's abandoned stream keeps generating", "llmcli/tasks/generate.py",
           "should_stop=lambda: streamer.done or bool(cancelled and cancelled()))",
           "should_stop=lambda: streamer.done)", "tests/test_serve.py -k gone"),
    Mutant("the server's queue is unbounded", "llmcli/serve/worker.py",
           "            if len(self.waiting) >= self.size:", "            if False:", "tests/test_serve.py -k 503"),
    Mutant("the server compares no API key", "llmcli/serve/app.py",
           "        if self.settings.api_key and scope", "        if False and scope",
           "tests/test_serve.py -k bad_requests"),
    Mutant("echoed logprobs shifted by one token", "llmcli/serve/app.py",
           "    scored_from = max(first, 1)", "    scored_from = max(first, 2)",
           "tests/test_serve.py -k echoed"),
    Mutant("the server never batches", "llmcli/serve/app.py",
           "EngineWorker(settings.queue_size, settings.max_batch)", "EngineWorker(settings.queue_size, 1)",
           "tests/test_serve.py -k batched"),
    Mutant("batched answers go to the wrong requests", "llmcli/serve/worker.py",
           "            for job, result in zip(live, results):", "            for job, result in zip(live, results[::-1]):",
           "tests/test_serve.py -k batched"),
    Mutant("one batched prompt's error fails the whole batch", "llmcli/serve/app.py",
           "        except LlmcliError:\n            pass", "        except ZeroDivisionError:\n            pass",
           "tests/test_serve.py -k batched"),
    Mutant("--help labels arguments with Python types", "llmcli/cli/app.py",
           "    typer.core.TyperArgument.display_type_rich = _argument_type_label", "    pass",
           "tests/test_errors.py -k help_names"),
    Mutant("llama.cpp ignores --top-p", "llmcli/engines/llamacpp.py",
           "add(lib.llama_sampler_init_top_p(options.top_p, 1))", "pass",
           "tests/test_llamacpp.py -k sampling_controls"),
    Mutant("llama.cpp ignores --min-p", "llmcli/engines/llamacpp.py",
           "add(lib.llama_sampler_init_min_p(options.min_p, 1))", "pass",
           "tests/test_llamacpp.py -k sampling_controls"),
    Mutant("llama.cpp samples each prefill their prompt again", "llmcli/engines/llamacpp.py",
           "live = sequences.add(prompt, self.sampler(options, prompt), options.max_new_tokens, leader)",
           "live = sequences.add(prompt, self.sampler(options, prompt), options.max_new_tokens, None)",
           "tests/test_llama_batch.py -k share_the_prefill"),
    Mutant("llama.cpp decodes a batch one sequence at a time", "llmcli/engines/llamacpp.py",
           "        if len(batch) * samples == 1 or ", "        if True or ",
           "tests/test_llama_batch.py -k share_the_prefill"),
    Mutant("a batched sequence's seed depends on its place in the batch", "llmcli/engines/llamacpp.py",
           "            for prompt in batch:\n                leader = None", "            for prompt in reversed(batch):\n                leader = None",
           "tests/test_llama_batch.py -k seeded"),
    Mutant("a long prompt fills the batch past its size", "llmcli/engines/llama_sequences.py",
           "            chunk = sequence.pending[:room]", "            chunk = sequence.pending",
           "tests/test_llama_batch.py -k chunks"),
    Mutant("llama.cpp's OpenMP threads spin as long as libgomp's default", "llmcli/engines/llamacpp.py",
           '        os.environ.setdefault("GOMP_SPINCOUNT", "1000")', "        pass",
           "tests/test_llama_host.py -k spin_briefly"),
    Mutant("the extra-buffer decision never reaches the model parameters", "llmcli/engines/llamacpp.py",
           "    params.use_extra_bufts = host_check().extra_buffers\n", "",
           "tests/test_llama_host.py -k turns_them_off"),
    Mutant("a probe that dies with extra buffers is not retried without", "llmcli/engines/llama_host.py",
           "    second = run_probe(False)", "    second = first",
           "tests/test_llama_host.py -k turns_them_off"),
    Mutant("the probe's answer is not cached", "llmcli/engines/llama_host.py",
           "    if lasting:\n        write_cached(key, result)", "    pass",
           "tests/test_llama_host.py -k turns_them_off"),
    Mutant("the override is ignored", "llmcli/engines/llama_host.py",
           'return HostCheck(True, chosen == "1", f"{ENV}={chosen}")', "pass",
           "tests/test_llama_host.py -k override_wins"),
    Mutant("a SIGILL is not reported", "llmcli/engines/llama_host.py",
           "    libc.signal(signal.SIGILL, _on_illegal_instruction)", "    pass",
           "tests/test_llama_host.py -k illegal_instruction"),
    Mutant("the server's sequences ignore their seed", "llmcli/serve/scheduler.py",
           "chain = self.engine.sampler(choice.options, choice.ids, seed=choice.seed)",
           "chain = self.engine.sampler(choice.options, choice.ids)",
           "tests/test_serve_llama.py -k concurrent"),
    Mutant("the server's n choices each prefill their prompt", "llmcli/serve/scheduler.py",
           "        if previous is not None and previous.ids is choice.ids:", "        if False:",
           "tests/test_serve_llama.py -k seeded"),
    Mutant("the server decodes one request at a time", "llmcli/serve/scheduler.py",
           "        return len(self.sequences.live) < self.parallel and", "        return not self.sequences.live and",
           "tests/test_serve_llama.py -k concurrent"),
    Mutant("no prefix reuse across requests", "llmcli/engines/llama_sequences.py",
           "            if shared > size:", "            if False:",
           "tests/test_serve_llama.py -k cached_prefix"),
    Mutant("prefix reuse copies one token too many", "llmcli/engines/llama_sequences.py",
           "            shared = min(common_prefix(tokens, prompt), len(prompt) - 1)",
           "            shared = min(common_prefix(tokens, prompt) + 1, len(prompt) - 1)",
           "tests/test_serve_llama.py -k cached_prefix"),
    Mutant("a client gone mid-stream keeps its sequence", "llmcli/serve/scheduler.py",
           "            if running.job.cancelled.is_set():", "            if False:",
           "tests/test_serve_llama.py -k gone_mid_stream"),
    Mutant("chat ends when the conversation outgrows the context", "llmcli/tasks/chat.py",
           "        while len(self.history) > 1 and", "        while False and",
           "tests/test_generate.py -k oldest_turns"),
    Mutant("a stopped reply is forgotten with its message", "llmcli/tasks/chat.py",
           '            self.history.append({"role": "assistant", "content": "".join(pieces)})\n            raise',
           "            self.history.pop()\n            raise",
           "tests/test_generate.py -k stopped_reply"),
    Mutant("chat reads every line as a message", "llmcli/cli/chat.py",
           """    if not line.strip().startswith('\"\"\"'):""", "    if True:",
           "tests/test_generate.py -k multi_line"),
    Mutant("chat content parts refused", "llmcli/serve/schemas.py",
           "        if isinstance(value, str):\n            return value\n        texts = []",
           "        if isinstance(value, str):\n            return value\n        raise ValueError('content must be a string')\n        texts = []",
           "tests/test_serve.py -k real_clients"),
    Mutant("the usage chunk is sent unasked", "llmcli/serve/app.py",
           "            if with_usage:  # OpenAI", "            if True:  # OpenAI",
           "tests/test_serve.py -k real_clients"),
    Mutant("a completion's default length ignores the server's limit", "llmcli/serve/app.py",
           "        return min(default, limit) if limit else default", "        return default",
           "tests/test_serve.py -k real_clients"),
    Mutant("SIGTERM leaves open streams to be cancelled", "llmcli/serve/__init__.py",
           "            app.state.worker.drain(time.monotonic() + GRACE_SECONDS / 2)\n", "",
           "tests/test_serve.py -k sigterm"),
    Mutant("Llama's key/value heads keep LlamaConfig's default", "llmcli/scratch.py",
           "        config = config_class(**settings)", "        config = config_class()\n        apply_overrides(config, settings)",
           "tests/test_finetune.py -k heads_follow"),
    Mutant("a failed fresh run leaves its files", "llmcli/tasks/finetune_loop.py",
           "        if fresh and not checkpoints.checkpoint_dirs(output):", "        if False:",
           "tests/test_finetune.py -k heads_follow"),
    Mutant("the last step is not checkpointed", "llmcli/tasks/finetune_loop.py",
           ' or state["step"] == steps:\n                checkpoint()', ' and state["step"] < steps:\n                checkpoint()',
           "tests/test_finetune.py -k extends"),
    Mutant("eval scores a completion's prompt too", "llmcli/tasks/evaluate.py",
           "    scored = len(ids) - len(prompt_ids)\n", "    scored = len(ids) - 1\n",
           "tests/test_evaluate.py -k completion_given"),
    Mutant("an adapter names the cache's conversion as its base", "llmcli/tasks/finetune.py",
           "models.portable_reference(loaded.source)", "str(models.local_model_dir(loaded.source))",
           "tests/test_finetune.py -k survives_the_cache"),
    Mutant("a piped stdin needs '-'", "llmcli/cli/common.py",
           "    if not arguments and not sys.stdin.isatty():", "    if False:",
           "tests/test_generate.py -k piped_stdin"),
    Mutant("sampling options at temperature 0 are silently ignored", "llmcli/tasks/generate.py",
           "    if ignored and options.temperature == 0:", "    if False:",
           "tests/test_errors.py -k matrix"),
    Mutant("the logged loss is the last batch's", "llmcli/tasks/finetune_loop.py",
           'last_loss = accelerator.reduce(interval[0], "mean").item() / interval[1]',
           'last_loss = accelerator.reduce(step_loss, "mean").item()',
           "tests/test_finetune.py -k mean_since_the_last_record"),
    Mutant("a resume forgets the loss since the last record", "llmcli/tasks/finetune_loop.py",
           'float(state.get("interval_loss", 0.0))', "0.0",
           "tests/test_finetune.py -k mean_since_the_last_record"),
    Mutant("the README's fill-mask example goes stale", "README.md",
           '"score": 0.39624549717445134', '"score": 0.41046796455399437',
           "tests/test_fill_mask.py -k readme"),
    Mutant("tables keep rich's trailing spaces", "llmcli/render.py",
           '    stdout.write("\\n".join(line.rstrip() for line in captured.get().split("\\n")))',
           '    stdout.write(captured.get())',
           "tests/test_evaluate.py -k trailing"),
    Mutant("a sample whose leader is cancelled waits forever", "llmcli/engines/llama_sequences.py",
           "            if follower.leader is sequence:\n", "            if False:\n",
           "tests/test_llama_batch.py -k cancelled_mid_prefill"),
    Mutant("a batch's constraint mask is never applied", "llmcli/engines/llama_sequences.py",
           "                    sequence.matcher.mask(self.engine.logits_row(self.context, sequence.output))",
           "                    pass",
           "tests/test_constraints.py -k validate"),
    Mutant("a lone sequence's constraint mask is never applied", "llmcli/engines/llamacpp.py",
           "                    matcher.mask(self.logits_row(self.context, -1))", "                    pass",
           "tests/test_constraints.py -k regex_and"),
    Mutant("the hf engine's constraint mask is never applied", "llmcli/engines/hf.py",
           '                scores[row, :allowed.shape[0]].masked_fill_(~allowed, float("-inf"))', "                pass",
           "tests/test_constraints.py -k validate"),
    Mutant("the hf engine's matchers never follow the tokens taken", "llmcli/engines/hf.py",
           "                    self.matchers[row].accept(token, self.eos_ids, None, 0)", "                    pass",
           "tests/test_constraints.py -k likeliest"),
    Mutant("the hf engine's mask also sharpens the allowed tokens", "llmcli/engines/hf.py",
           '                scores[row, :allowed.shape[0]].masked_fill_(~allowed, float("-inf"))',
           '                scores[row, :allowed.shape[0]].masked_fill_(~allowed, float("-inf")).mul_(1.01)',
           "tests/test_constraints.py -k distribution"),
    Mutant("--json drops the incomplete flag of constrained output", "llmcli/tasks/generate.py",
           '                      incomplete=reason != "eos" if constrained else None)',
           '                      incomplete=False if constrained else None)',
           "tests/test_constraints.py -k incomplete"),
    Mutant("serve ignores response_format", "llmcli/serve/app.py",
           '    if chosen is None or chosen.type == "text":', "    if True:",
           "tests/test_serve_structured.py -k parse"),
    Mutant("the scheduler gives its sequences no matcher", "llmcli/serve/scheduler.py",
           "reuse_prefix=self.prefix_cache, matcher=self.engine.matcher(choice.options))",
           "reuse_prefix=self.prefix_cache)", "tests/test_serve_structured.py -k concurrent"),
    Mutant("a schema is compiled only when decoding starts", "llmcli/serve/app.py",
           "    if options.constraint is None:\n        return\n    try:",
           "    if True:\n        return\n    try:", "tests/test_serve_structured.py -k compiled"),
    Mutant("chat drops its constraint", "llmcli/cli/chat.py",
           "        constraint=constraint_from_options(schema, regex, grammar, choice),\n", "",
           "tests/test_constraints.py -k chat_constrains"),
    Mutant("export leaves Llama's query rows in Hugging Face's rotary layout", "llmcli/tasks/export.py",
           "            data = unpermute_rotary(data, config.num_attention_heads)", "            pass",
           "tests/test_export.py -k tiny_llama"),
    Mutant("export leaves GPT-2's Conv1D weights untransposed", "llmcli/tasks/export.py",
           "            data = data.T  # Conv1D stores (in, out)", "            pass", "tests/test_export.py -k tiny_gpt2"),
    Mutant("export names every pre-tokenizer gpt-2", "llmcli/tasks/export.py",
           '        return "smollm"  # each digit apart, then GPT-2\'s regex', '        return "gpt-2"',
           "tests/test_export.py -k round_trip"),
    Mutant("export always adds BOS", "llmcli/tasks/export.py",
           '    special.add_special_token = {"bos": tokenizer.bos_token_id is not None and',
           '    special.add_special_token = {"bos": True or', "tests/test_export.py -k tiny_llama"),
    Mutant("export drops the chat template", "llmcli/tasks/export.py",
           "    special.chat_template = tokenizer.chat_template or None", "    special.chat_template = None",
           "tests/test_export.py -k tiny_llama"),
    Mutant("export leaves the file private", "llmcli/tasks/export.py",
           "        os.chmod(temporary, 0o666 & ~umask)", "        pass", "tests/test_export.py -k ordinary"),
    Mutant("an interrupt inside a weakref callback is printed and dropped", "llmcli/cli/__init__.py",
           "    error = unraisable.exc_value\n", "    error = None\n", "tests/test_robustness.py -k sent_again"),
    Mutant("/metrics counts no generated tokens", "llmcli/serve/metrics.py",
           '        self.generation_tokens.inc(usage["completion_tokens"])', "        pass",
           "tests/test_serve_llama.py -k metrics_count"),
]


def copy_tree(destination: Path) -> None:
    """The working tree as git sees it (tracked and new files, not ignored ones such as .venv)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)


def old_tests(copy: Path, revision: str) -> None:
    """Replace the copy's tests with those of an earlier commit (to see what an older suite caught)."""
    shutil.rmtree(copy / "tests")
    archive = subprocess.run(["git", "archive", revision, "tests"], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(copy)], input=archive, check=True)


def run_mutant(mutant: Mutant, tests_from: str | None = None) -> tuple[str, float]:
    with tempfile.TemporaryDirectory(prefix="llmcli-mutant-") as tmp:
        copy = Path(tmp)
        copy_tree(copy)
        selection = mutant.tests.split()
        if tests_from:  # the older suite's names differ: run the whole files, without the slow tests
            old_tests(copy, tests_from)
            selection = [part for part in selection if part.endswith(".py")] + ["-m", "not slow"]
        target = copy / mutant.path
        source = target.read_text()
        if source.count(mutant.original) != 1:
            return f"stale: the text to break occurs {source.count(mutant.original)} times in {mutant.path}", 0.0
        target.write_text(source.replace(mutant.original, mutant.broken))
        env = {**os.environ, "PYTHONPATH": str(copy)}
        where = subprocess.run([sys.executable, "-c", "import llmcli; print(llmcli.__file__)"], env=env, cwd=copy,
                               capture_output=True, text=True).stdout.strip()
        if not where.startswith(str(copy)):
            return f"setup: llmcli imported from {where}, not from the copy", 0.0
        began = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *selection],
                                env=env, cwd=copy, capture_output=True, text=True)
        seconds = time.perf_counter() - began
        if result.returncode == 1:
            return "killed", seconds
        if result.returncode == 0:
            return "SURVIVED", seconds
        return f"error: pytest exit {result.returncode}: {result.stdout.strip().splitlines()[-1:]}", seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--list", action="store_true", help="print the mutants' names and exit")
    parser.add_argument("--tests-from", metavar="REV", help="run the (whole) test files of commit REV instead")
    args = parser.parse_args()
    if args.list:
        print("\n".join(m.name for m in MUTANTS))
        return 0
    chosen = [m for m in MUTANTS if not args.names or m.name in args.names]
    unknown = set(args.names) - {m.name for m in MUTANTS}
    if unknown:
        parser.error(f"unknown mutants: {', '.join(sorted(unknown))}")
    failures = 0
    for mutant in chosen:
        outcome, seconds = run_mutant(mutant, args.tests_from)
        failures += outcome != "killed"
        print(f"{outcome:<10} {seconds:6.1f} s  {mutant.name}  ({mutant.tests})", flush=True)
    print(f"{len(chosen) - failures} of {len(chosen)} mutants killed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
