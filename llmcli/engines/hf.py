"""The Hugging Face engine: transformers' own `generate` and forward passes, so greedy output equals
`model.generate` token for token and scores equal the reference computations."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Container, Sequence

from llmcli.engines import ProgressCallback, TokensCallback, Window, process_peak_rss_mb, same_shape_batches
from llmcli.models import LoadedModel


class HFEngine:
    name = "hf"
    default_batch_size = 1  # one prompt per generate call unless --batch-size asks for left-padded batches

    def __init__(self, loaded: LoadedModel, static_cache: bool = False, draft: LoadedModel | None = None) -> None:
        self.loaded = loaded
        self.source, self.kind, self.device = loaded.source, loaded.kind, loaded.device
        self.static_cache = static_cache  # fixed-size KV cache; on CUDA transformers then compiles the decode step
        self.draft = draft  # assisted decoding: a small model proposes tokens that this one verifies
        self.weights = str(loaded.model.dtype).removeprefix("torch.")
        tokenizer = loaded.tokenizer
        config = loaded.model.config
        self.context_length = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        self.chat_template = getattr(tokenizer, "chat_template", None) or None
        self.bos_id, self.eos_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.adds_bos = self.bos_id is not None and tokenizer("a")["input_ids"][:1] == [self.bos_id]
        eos = loaded.model.generation_config.eos_token_id if hasattr(loaded.model, "generation_config") else None
        if eos is None:
            eos = tokenizer.eos_token_id
        self.eos_ids = set(eos) if isinstance(eos, list) else ({eos} if eos is not None else set())
        from llmcli.constraints import Constraints

        self.constraints = Constraints(self.guidance_tokenizer, config.vocab_size)  # structured output
        self.adapters: set[str] = set()  # peft adapters loaded beside the base by add_adapter
        self.base_wrapped = False  # the model is a base that add_adapter wrapped in a PeftModel

    def add_adapter(self, name: str, directory: str | Path) -> None:
        """A peft LoRA adapter of this model's base loaded beside it as `name` (peft's load_adapter), so that
        one base serves several adapters: generate's `adapters` chooses one per prompt."""
        from peft import PeftModel

        model = self.loaded.model
        if isinstance(model, PeftModel):
            model.load_adapter(str(directory), adapter_name=name)
        else:
            self.loaded.model = PeftModel.from_pretrained(model, str(directory), adapter_name=name).eval()
            self.base_wrapped = True
        self.adapters.add(name)

    def adapter_names(self, adapters: Sequence[str | None] | None, prompts: int, rows: int) -> dict[str, Any]:
        """generate's `adapter_names` (peft's mixed batches: each row's adapter, "__base__" for none), or
        nothing when no prompt names one and the model runs as loaded."""
        adapters = list(adapters) if adapters else [None] * prompts
        if not any(adapters) and not self.base_wrapped:
            return {}
        unknown = [name for name in adapters if name is not None and name not in self.adapters]
        if unknown:
            raise KeyError(unknown[0])
        # a prompt of a plain call runs the model as loaded: its own adapter, or the base when wrapped
        default = "__base__" if self.base_wrapped else "default"
        names = [name or default for name in adapters]
        return {"adapter_names": [name for name in names for _ in range(rows // len(names))]}

    def as_loaded(self) -> Any:
        """Scores and plain generations of a base that add_adapter wrapped run the base, as before."""
        return self.loaded.model.disable_adapter() if self.base_wrapped else nullcontext()

    @property
    def tokenizer(self) -> Any:
        return self.loaded.tokenizer

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        return self.tokenizer(text, add_special_tokens=add_special)["input_ids"]

    def token_text(self, token: int | None) -> str:
        return "" if token is None else self.tokenizer.convert_ids_to_tokens(token)

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    tools: list[dict[str, Any]] | None = None, template_kwargs: dict[str, Any] | None = None) -> str:
        from llmcli.engines.chat_template import template_variables

        # self.chat_template, not the tokenizer's: --chat-template may replace it
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tools=tools,
                                                  add_generation_prompt=add_generation_prompt, tokenize=False,
                                                  **template_variables(template_kwargs))

    def encode_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                    template_kwargs: dict[str, Any] | None = None) -> list[int]:
        # The template already holds the special tokens; adding them again would double the BOS.
        text = self.render_chat(messages, tools=tools, template_kwargs=template_kwargs)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def guidance_tokenizer(self) -> Any:
        """llguidance's tokenizer of this (fast) tokenizer, ending at generate's EOS ids."""
        from llguidance.hf import from_tokenizer

        from llmcli.errors import UsageError

        try:
            return from_tokenizer(self.tokenizer, n_vocab=self.constraints.n_vocab,
                                  eos_token=sorted(self.eos_ids) or None)
        except ValueError as exc:  # a slow (Python) tokenizer, or a vocabulary llguidance cannot read (WordPiece)
            raise UsageError(f"this model's tokenizer cannot be used for constrained output: {exc}",
                             "Constrained output needs a fast byte-level BPE or SentencePiece tokenizer, as GPT-2-, "
                             "Llama- and most chat models have.") from exc

    def decode(self, ids: Sequence[int], keep_special: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=not keep_special)

    def set_seed(self, seed: int) -> None:
        from transformers import set_seed

        set_seed(seed)

    def generate(self, batch: list[list[int]], options: Any, on_tokens: TokensCallback,
                 should_stop: Callable[[], bool], adapters: Sequence[str | None] | None = None) -> list[list[int]]:
        """`model.generate` on the left-padded batch; stop strings are generate's own `stop_strings`.
        `adapters`: per prompt, the name of an adapter (add_adapter) to run it with, or None for the model as
        loaded; prompts of different adapters share the batch (peft's `adapter_names`)."""
        tokenizer, model = self.tokenizer, self.loaded.model
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"  # decoder-only models continue from the right edge
        inputs = tokenizer.pad({"input_ids": batch}, return_tensors="pt").to(self.device)
        decoding = assisted_kwargs(self.loaded, self.draft)
        if self.static_cache and not decoding and not options.prompt_lookup:  # assisted decoding needs a dynamic cache
            decoding["cache_implementation"] = "static"
        from transformers import LogitsProcessorList, StoppingCriteriaList

        from llmcli.reasoning import sequence_matcher

        rows = len(batch) * options.num_return_sequences
        matchers = [sequence_matcher(self, options) for _ in range(rows)]
        processors = [ConstrainedLogits(matchers, self.eos_ids)] if matchers[0] is not None else []
        presence, frequency = getattr(options, "presence_penalty", 0.0), getattr(options, "frequency_penalty", 0.0)
        if presence or frequency:
            processors.insert(0, OpenAIPenalties(inputs["input_ids"].shape[1], presence, frequency))
        output = model.generate(**inputs, **sampling_kwargs(options), **decoding,
                                **self.adapter_names(adapters, len(batch), rows),
                                streamer=StepStreamer(on_tokens),
                                tokenizer=tokenizer, pad_token_id=tokenizer.pad_token_id,
                                logits_processor=LogitsProcessorList(processors),
                                stopping_criteria=StoppingCriteriaList([AskedToStop(should_stop)]))
        return output[:, inputs["input_ids"].shape[1]:].tolist()

    def token_nlls(self, windows: list[Window], batch_size: int,
                   on_progress: ProgressCallback | None = None) -> list[float]:
        """Logits are computed only for scored positions (`logits_to_keep`), so memory grows with
        batch size and window, not text length."""
        import torch

        nlls: list[float] = []
        with torch.inference_mode(), self.as_loaded():
            for run in same_shape_batches(windows, batch_size):
                ids = torch.tensor([w.ids for w in run], device=self.device)
                scored = run[0].scored
                logits = self.loaded.model(input_ids=ids[:, :-1], logits_to_keep=scored).logits.float()
                targets = ids[:, -scored:]
                # log_softmax + gather, as HF's loss and lm-eval compute it. (torch 2.13's CPU cross_entropy
                # over a [batch, vocab, tokens] layout is 4e-5 relative low on SmolLM2; measured against float64.)
                token_nll = -logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
                nlls.extend(token_nll.flatten().tolist())
                if on_progress:
                    on_progress(len(run))
        return nlls

    def continuation_scores(self, sequences: list[list[int]], starts: list[int],
                            batch_size: int) -> list[tuple[float, bool]]:
        """For each sequence, the summed log-probability of its tokens from `start` on and whether each was
        the likeliest: lm-eval's HFLM computation (longest first, right-padded batches without a mask,
        which a causal model's earlier positions never see; log_softmax in the model's float32). As
        HFLM does for one-token answers, sequences with the same input (a question's one-token answers)
        share one forward row."""
        import torch

        rows_of: dict[tuple[int, ...], list[int]] = {}
        for number, sequence in enumerate(sequences):
            rows_of.setdefault(tuple(sequence[:-1]), []).append(number)
        inputs = sorted(rows_of, key=len, reverse=True)
        answers: list[tuple[float, bool]] = [(0.0, False)] * len(sequences)
        with torch.inference_mode(), self.as_loaded():
            for begin in range(0, len(inputs), batch_size):
                run = inputs[begin:begin + batch_size]
                width = len(run[0])
                ids = torch.zeros((len(run), width), dtype=torch.long)
                for row, tokens in enumerate(run):
                    ids[row, :len(tokens)] = torch.tensor(tokens)
                keep = width - min(starts[n] - 1 for tokens in run for n in rows_of[tokens])  # rows any answer reads
                logits = self.loaded.model(input_ids=ids.to(self.device), logits_to_keep=keep).logits.float()
                logprobs = logits.log_softmax(-1)
                for row, tokens in enumerate(run):
                    for number in rows_of[tokens]:
                        sequence, start = sequences[number], starts[number]
                        first = start - 1 - (width - keep)
                        scored = logprobs[row, first:first + len(sequence) - start]
                        targets = torch.tensor(sequence[start:], device=scored.device)
                        chosen = scored.gather(-1, targets[:, None]).squeeze(-1)
                        answers[number] = (float(chosen.sum()), bool((scored.argmax(-1) == targets).all()))
        return answers

    def token_logprobs(self, window: Window, top: int) -> tuple[list[float], list[list[tuple[int, float]]]]:
        """As token_nlls computes them (one window, the same operations), plus the top tokens."""
        import torch

        with torch.inference_mode(), self.as_loaded():
            ids = torch.tensor([window.ids], device=self.device)
            logits = self.loaded.model(input_ids=ids[:, :-1], logits_to_keep=window.scored).logits.float()
            logprobs = logits.log_softmax(-1)
            chosen = logprobs.gather(-1, ids[:, -window.scored:, None]).squeeze(-1)[0].tolist()
            if not top:
                return chosen, [[] for _ in chosen]
            values, tokens = logprobs[0].topk(top, dim=-1)
            return chosen, [list(zip(t, v)) for t, v in zip(tokens.tolist(), values.tolist())]

    def peak_memory_mb(self) -> float:
        """Peak accelerator memory on GPUs, else the process's peak resident set."""
        import torch

        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return process_peak_rss_mb()


class OpenAIPenalties:
    """OpenAI's presence and frequency penalties as a logits processor (transformers has neither): a
    token's logit loses `frequency` for each time it was generated and `presence` once if it was, the
    prompt (the first `prompt_width` columns of the padded batch) not counted; llama.cpp's penalties
    sampler computes the same."""

    def __init__(self, prompt_width: int, presence: float, frequency: float) -> None:
        self.prompt_width, self.presence, self.frequency = prompt_width, presence, frequency

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        generated = input_ids[:, self.prompt_width:]
        if generated.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - counts * self.frequency - (counts > 0).to(scores.dtype) * self.presence


class ConstrainedLogits:
    """A logits processor for structured output: each row's matcher follows the token the row took
    last step, then sets the logits of the tokens it does not allow to -inf. transformers runs it after
    its own processors (repetition penalty) and before the sampling warpers, so top-k and top-p choose
    among allowed tokens, as llama.cpp's sampler chain does after our mask there."""

    def __init__(self, matchers: list[Any], eos_ids: Container[int]) -> None:
        self.matchers, self.eos_ids = matchers, eos_ids
        self.ended = [False] * len(matchers)  # a row that took EOS: generate pads it from then on
        self.started = False

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        if self.started:  # the first call sees only the prompt
            for row, token in enumerate(input_ids[:, -1].tolist()):
                if not self.ended[row]:
                    self.matchers[row].accept(token, self.eos_ids, None, 0)
                    self.ended[row] = token in self.eos_ids
        self.started = True
        for row, matcher in enumerate(self.matchers):
            if not self.ended[row]:
                allowed = torch.from_numpy(matcher.allowed()).to(scores.device)
                scores[row, :allowed.shape[0]].masked_fill_(~allowed, float("-inf"))
                scores[row, allowed.shape[0]:] = float("-inf")
        return scores


class AskedToStop:
    """A stopping criterion that asks `should_stop` after each step (a stop string was printed, or a
    server's client went away). transformers ends the whole batch when it says yes."""

    def __init__(self, should_stop: Callable[[], bool]) -> None:
        self.should_stop = should_stop

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        return torch.full((input_ids.shape[0],), self.should_stop(), dtype=torch.bool, device=input_ids.device)


class StepStreamer:
    """A `generate` streamer that passes each step's new ids on (generate first passes the prompt)."""

    def __init__(self, on_tokens: TokensCallback) -> None:
        self.on_tokens = on_tokens
        self.prompt_seen = False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.on_tokens(value.reshape(-1).tolist())

    def end(self) -> None:
        pass


def sampling_kwargs(options: Any) -> dict[str, Any]:
    """Only what the user set, so the model's own generation_config supplies the rest, as in HF."""
    kwargs: dict[str, Any] = {"max_new_tokens": options.max_new_tokens}
    if options.temperature == 0:
        kwargs["do_sample"] = False
    else:
        kwargs.update(do_sample=True, temperature=options.temperature)
        for name in ("top_k", "top_p", "min_p"):
            if getattr(options, name) is not None:
                kwargs[name] = getattr(options, name)
    if options.repetition_penalty is not None:
        kwargs["repetition_penalty"] = options.repetition_penalty
    if getattr(options, "logit_bias", None):  # transformers' SequenceBiasLogitsProcessor, one-token sequences
        kwargs["sequence_bias"] = {(token,): bias for token, bias in options.logit_bias.items()}
    if options.num_return_sequences > 1:
        kwargs["num_return_sequences"] = options.num_return_sequences
    if options.stop:
        kwargs["stop_strings"] = options.stop
    if options.prompt_lookup:
        kwargs["prompt_lookup_num_tokens"] = options.prompt_lookup
    return kwargs


def assisted_kwargs(loaded: LoadedModel, draft: LoadedModel | None) -> dict[str, Any]:
    if draft is None:
        return {}
    kwargs = {"assistant_model": draft.model}
    if draft.tokenizer.get_vocab() != loaded.tokenizer.get_vocab():  # universal assisted decoding
        kwargs["assistant_tokenizer"] = draft.tokenizer
    return kwargs

