"""Option declarations shared by several commands."""


from typing import Annotated, Optional

import typer

def completes(*values: str):
    """Shell completion of an option's choices (`llmcli --install-completion`), validated by the task as
    before: the values are offered, not enforced here."""
    def complete(incomplete: str) -> list[str]:  # typer passes the parameters it finds by name
        return [value for value in values if value.startswith(incomplete)]

    return complete


# Options shared by the commands that load a model.
ModelOption = Annotated[
    Optional[str],
    typer.Option("--model", "-m", envvar="LLMCLI_MODEL", show_envvar=True, help="Hub id (org/name, or "
                 "org/name:QUANT for a GGUF file; from the cache, see 'llmcli pull'), local save_pretrained dir, "
                 ".gguf file, or 'smollm2'. Default: the embedded SmolLM2-135M-Instruct."),
]
DeviceOption = Annotated[Optional[str], typer.Option(envvar="LLMCLI_DEVICE", show_envvar=True,
                                                     help="cpu, cuda, cuda:N or mps. Default: accelerate's choice.")]
DtypeOption = Annotated[str, typer.Option(help="auto (bf16 on capable GPUs, else fp32), float32, bfloat16, float16.",
                                          autocompletion=completes("auto", "float32", "bfloat16", "float16"))]
# Commands whose output is a score default to float32, so that scores match the references on any machine
ScoringDtypeOption = Annotated[str, typer.Option(help="float32, so scores do not depend on the machine; auto, "
                                                 "bfloat16 or float16 trade exactness for speed.")]
TrustOption = Annotated[bool, typer.Option(help="Allow the model repository's own Python code to run.")]
PickleOption = Annotated[bool, typer.Option(help="Allow pickle weights (*.bin), which can run code when loaded; "
                                            "safetensors are always preferred.")]
EngineOption = Annotated[str, typer.Option(help="auto (llama.cpp for .gguf models when installed, else hf), hf "
                                           "(transformers) or llama.cpp.",
                                           autocompletion=completes("auto", "hf", "llama.cpp"))]
ThreadsOption = Annotated[Optional[int], typer.Option(help="CPU threads. Default: the physical cores.",
                                                      show_default=False)]
# What a run makes of the model's context and chat format: generate, chat (serve takes the template)
CtxSizeOption = Annotated[Optional[int], typer.Option(
    "--ctx-size", "-c", show_default=False, help="Tokens of context this run uses (prompt and reply), at most the "
    "model's trained context (llama-cli -c, ollama num_ctx). Default: the trained context.")]
ChatTemplateOption = Annotated[Optional[str], typer.Option(
    metavar="FILE", show_default=False, help="A Jinja chat template file used in place of the model's own (as "
    "transformers renders templates).")]
# reasoning models (generate, chat and serve): llama-server's option names
ReasoningFormatOption = Annotated[str, typer.Option(
    autocompletion=completes("auto", "deepseek", "none"), help="Split a reply into thinking and answer: auto (by "
    "the markers the chat template writes, such as <think>…</think>), deepseek (<think>…</think>), none (no split).")]
ReasoningOption = Annotated[str, typer.Option(
    "--reasoning", autocompletion=completes("auto", "on", "off"), help="Thinking on or off through the template's "
    "switch (enable_thinking); off on a template without one forces an empty thinking block. auto: the template's "
    "default.")]
ReasoningBudgetOption = Annotated[Optional[int], typer.Option(
    metavar="N", show_default=False, help="Thinking tokens at most: then the end marker (</think>) is forced and "
    "the answer follows. 0: no thinking.")]
HideReasoningOption = Annotated[bool, typer.Option("--hide-reasoning", help="Do not show a thinking model's "
                                                   "thinking (only its answer).")]
# llama.cpp's speculative decoding: generate, chat and serve
SpeculativeOption = Annotated[str, typer.Option(
    autocompletion=completes("auto", "on", "off"), help="llama.cpp: propose tokens (n-gram lookup in the prompt and "
    "text, or --draft-model) and check them in one decode; same output. auto: only while it pays, per sequence.")]
DraftMaxOption = Annotated[int, typer.Option(help="llama.cpp: tokens proposed per step at most (1-64).")]
DraftModelOption = Annotated[Optional[str], typer.Option(help="A small model with the same vocabulary proposing "
                                                         "tokens (a .gguf on llama.cpp); same greedy output.",
                                                         show_default=False)]
# OpenAI's sampling adjustments: generate and chat (serve takes them as request fields)
PresencePenaltyOption = Annotated[float, typer.Option(help="In [-2, 2]: subtracted once from the logit of every token "
                                                      "already generated (OpenAI's presence_penalty).")]
FrequencyPenaltyOption = Annotated[float, typer.Option(help="In [-2, 2]: subtracted from a token's logit for each "
                                                       "time it was generated (OpenAI's frequency_penalty).")]
LogitBiasOption = Annotated[Optional[list[str]], typer.Option(metavar="ID=BIAS", help="Add BIAS in [-100, 100] to "
                                                              "token ID's logit (repeatable; -100 bans it).",
                                                              show_default=False)]
# accelerate's big-model inference (hf engine): a model bigger than one device
# structured output (llmcli.constraints): generate and chat
SchemaOption = Annotated[Optional[str], typer.Option(help="Output valid for this JSON schema (a file or inline JSON; "
                                                     "'json' for any JSON object). In a pattern, \\d, \\w and \\s "
                                                     "are ASCII, as in --regex.", show_default=False)]
RegexOption = Annotated[Optional[str], typer.Option(help="Output matching this regular expression (Rust syntax). "
                                                    "\\d, \\w and \\s are ASCII, as with Python's re.ASCII: "
                                                    "[0-9], [A-Za-z0-9_], [ \\t\\n\\r\\f\\v]; \\p{Nd} is any "
                                                    "Unicode digit.", show_default=False)]
GrammarOption = Annotated[Optional[str], typer.Option(help="Output in this Lark grammar (a file).", show_default=False)]
ChoiceOption = Annotated[Optional[list[str]], typer.Option(help="Output exactly one of these (repeatable).",
                                                           show_default=False, metavar="TEXT")]
DeviceMapOption = Annotated[Optional[str], typer.Option(help="Spread the layers over GPUs, CPU memory and disk: "
                                                        "auto (or balanced, sequential). hf engine.",
                                                        show_default=False, rich_help_panel="Big models")]
MaxMemoryOption = Annotated[Optional[list[str]], typer.Option(metavar="DEVICE=SIZE", help="With --device-map: memory "
                                                              "one device may hold, e.g. cpu=2GiB or 0=20GiB "
                                                              "(repeatable).", rich_help_panel="Big models")]
OffloadDirOption = Annotated[Optional[str], typer.Option(help="With --device-map: where layers that fit no device go "
                                                         "(a fresh folder inside it, removed at exit). Default: a "
                                                         "temporary folder.", show_default=False,
                                                         rich_help_panel="Big models")]
# Launching one command on N processes and N machines (distributed.py); under an outside launcher
# (torchrun, accelerate launch) these are not needed: the command sees LOCAL_RANK and runs as a worker.
NumProcessesOption = Annotated[int, typer.Option(help="Processes on this machine (data parallel; one GPU each, "
                                                 "or gloo on CPU).", rich_help_panel="Processes")]
NnodesOption = Annotated[int, typer.Option(help="Machines taking part (start the same command on each).",
                                           rich_help_panel="Processes")]
NodeRankOption = Annotated[int, typer.Option(help="This machine's number, 0..nnodes-1 (0 hosts the rendezvous).",
                                             rich_help_panel="Processes")]
MasterAddrOption = Annotated[str, typer.Option(help="Machine 0's address, as the others reach it.",
                                               rich_help_panel="Processes")]
MasterPortOption = Annotated[Optional[int], typer.Option(help="A free TCP port on machine 0 (needed with --nnodes "
                                                         "above 1).", show_default=False,
                                                         rich_help_panel="Processes")]
# Tools from MCP servers (chat, generate): llmcli/agent.py runs the loop, llmcli/mcp_tools.py the servers
McpOption = Annotated[Optional[str], typer.Option(
    "--mcp", metavar="FILE.json", help='MCP servers whose tools the model may call, in Claude Desktop\'s format: '
    '{"mcpServers": {NAME: {"command", "args", "env"} | {"url", "headers"}}}. Tools are named SERVER_TOOL.')]
ToolsOption = Annotated[Optional[str], typer.Option(
    "--tools", metavar="TOOL,...", help="Offer only these tools (SERVER_TOOL names). Default: every tool.")]
ToolChoiceOption = Annotated[str, typer.Option(
    "--tool-choice", metavar="auto|required|none|TOOL", autocompletion=completes("auto", "required", "none"), help="As OpenAI's tool_choice; required and TOOL force a "
    "call on the first step only (a small model often needs that).")]
ApproveOption = Annotated[Optional[list[str]], typer.Option(
    "--approve", metavar="TOOL,...|all", help="Run these tools without asking (repeatable). generate runs only "
    "approved tools; chat asks about the others.")]
MaxToolStepsOption = Annotated[int, typer.Option(
    "--max-tool-steps", help="Model replies that may call tools in one turn; the next one must answer.")]
ToolTimeoutOption = Annotated[float, typer.Option(
    "--tool-timeout", help="Seconds a tool call may take; a server that takes longer is stopped and the call "
    "fails (the conversation goes on).")]
