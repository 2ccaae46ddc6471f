"""The command line: option declarations and validation only; the work happens in `llmcli.tasks`.
One module per command; importing this package registers them all on `app` (in --help's order).

Nothing heavy is imported at module level, so `llmcli --help` does not load torch or transformers.
No module here uses `from __future__ import annotations`: typer would then evaluate every option's
annotation from its string on each start (0.3 s of a cold `generate` on the AMD host).
"""


import sys
import traceback

import typer

try:  # typer 0.2x vendors its own click, whose exceptions are not click's
    from typer._click.exceptions import ClickException, NoArgsIsHelpError
except ImportError:  # older typer runs on click itself
    from click.exceptions import ClickException, NoArgsIsHelpError

from llmcli import render
from llmcli.cli import app as app_state
# each module registers its command on import; --help lists them in this order
from llmcli.cli import generate, fill_mask, embed, rerank, evaluate, finetune, chat, serve, export, pull, info  # noqa: F401, I001
from llmcli.cli.app import app
from llmcli.cli.common import Terminated
from llmcli.cli.config import command_defaults
from llmcli.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_USAGE, LlmcliError, UsageError


def with_resume_default(argv: list[str]) -> list[str]:
    """`--resume` may stand alone (latest checkpoint) or take a directory; click wants a value, so a
    bare `--resume` becomes `--resume latest`."""
    argv = list(argv)
    for i, arg in enumerate(argv):
        if arg == "--resume" and (i + 1 == len(argv) or argv[i + 1].startswith("-")):
            argv.insert(i + 1, "latest")
            break
    return argv


# Options where a second value is a mistake rather than an override: each command runs one model
# (eval's --model is a list, and is left alone), and click would keep the last one silently.
ONE_VALUE_ONLY = ("model",)


def refuse_repeated_options(group) -> None:
    """Make a repeated ONE_VALUE_ONLY option a usage error on every command of `group`: each command's
    parse first reads its arguments with its own click parser, which lists every option occurrence."""
    for command in group.commands.values():
        if hasattr(command, "commands"):  # a group of its own (cache)
            refuse_repeated_options(command)
            continue
        watched = [p for p in command.params if p.name in ONE_VALUE_ONLY and not getattr(p, "multiple", True)]
        if watched:
            command.parse_args = checked_parse(command, command.parse_args, watched)


def checked_parse(command, parse_args, watched):
    def parse(ctx, args):
        if not ctx.resilient_parsing:  # shell completion parses half-typed lines
            _, _, order = command.make_parser(ctx).parse_args(args=list(args))
            for param in watched:
                if order.count(param) > 1:
                    raise UsageError(f"{param.opts[-1]}/{param.opts[0]} was given {order.count(param)} times, and "
                                     f"{command.name} runs one model", f"Pass {param.opts[0]} once.")
        return parse_args(ctx, args)

    return parse


def interrupt_on_sigterm() -> None:
    """SIGTERM (kill, a job scheduler's timeout) gets Ctrl-C's cleanup: flushed output, a finetune
    checkpoint, no half-written cache, exit 130."""
    import signal

    def raise_interrupt(signum, frame):
        raise Terminated

    signal.signal(signal.SIGTERM, raise_interrupt)
    sys.unraisablehook = redeliver_interrupts


def redeliver_interrupts(unraisable) -> None:
    """An interrupt that lands in a weakref callback or a finalizer cannot be raised there: Python
    prints it ("Exception ignored in ... Traceback") and drops it. Seen in CI with a Ctrl-C inside an
    import lock's callback, and a SIGTERM inside an exit-time finalizer. The signal is sent again
    instead, to be handled at the next point where it can be; anything else is reported as before.
    It is sent from another thread, once this hook has returned: raised here, its handler would run
    inside the hook, whose own exception Python also drops ("Exception ignored in sys.unraisablehook",
    seen on a Ctrl-C during a model load)."""
    import signal

    error = unraisable.exc_value
    if isinstance(error, Terminated):
        send_again(signal.SIGTERM)
    elif isinstance(error, KeyboardInterrupt):
        send_again(signal.SIGINT)
    elif type(error).__name__ == "SignalException" and hasattr(error, "sigval"):  # torchrun's handlers
        send_again(error.sigval)
    else:
        sys.__unraisablehook__(unraisable)


def send_again(signum: int) -> None:
    import os
    import threading

    threading.Timer(0.01, os.kill, (os.getpid(), signum)).start()


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app and turn every failure into the exit-code contract."""
    from llmcli import distributed

    interrupt_on_sigterm()
    if distributed.is_worker() and distributed.rank() != 0:
        render.quiet_other_ranks()
    command = typer.main.get_command(app)
    refuse_repeated_options(command)
    app_state.command_line = with_resume_default(sys.argv[1:] if argv is None else argv)
    try:
        code = command.main(args=app_state.command_line, prog_name="llmcli", standalone_mode=False,
                            default_map=command_defaults(command))
        if code == EXIT_INTERRUPTED:  # typer turns Ctrl-C into Exit(130), which click returns
            report_error("interrupted", None, EXIT_INTERRUPTED)
    except typer.Exit as exc:
        code = exc.exit_code
    except NoArgsIsHelpError as exc:  # bare `llmcli`: show the help, which is what was asked for
        print(exc.ctx.get_help())
        code = 0
    except ClickException as exc:  # bad option values and unknown options, from click itself
        context = getattr(exc, "ctx", None)
        code = report_error(exc.format_message(), f"Run '{context.command_path if context else 'llmcli'} --help' for "
                            "usage.", EXIT_USAGE)
    except (KeyboardInterrupt, typer.Abort):
        code = report_error("interrupted", None, EXIT_INTERRUPTED)
    except LlmcliError as exc:
        if app_state.debug_mode:
            traceback.print_exc()
        code = report_error(exc.message, exc.hint, exc.exit_code)
    except (render.OutputClosed, BrokenPipeError):  # `llmcli generate ... | head` closed the pipe: not an error
        end_quietly()
        code = 0
    except Exception as exc:
        if app_state.debug_mode:
            traceback.print_exc()
        code = report_error(f"internal error: {type(exc).__name__}: {exc}", "Run again with --debug for the "
                            "traceback.", EXIT_INTERNAL)
    # the command is over: a SIGTERM from now on (torchrun stopping the other workers once one has
    # failed) ends the exit as the default does, rather than raising Terminated inside an exit handler,
    # which Python prints as a traceback (seen once in CI, in test_a_failing_worker_ends_all_...)
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if distributed.is_worker():
        distributed.exit_worker(code or 0)
    sys.exit(code or 0)


def end_quietly() -> None:
    """The reader of stdout or stderr has gone (`| head`, `2>&1 | head`): both now write to /dev/null, so
    that nothing said from here on (the exit's flush included) fails again (the Python docs' SIGPIPE
    recipe, with exit status 0 as for the end of the output)."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        try:
            os.dup2(devnull, stream.fileno())
        except (OSError, ValueError):  # a stream without a file descriptor (a test's capture)
            pass


def report_error(message: str, hint: str | None, code: int) -> int:
    """The one `Error:` line; a worker we launched hands it to the launcher, which prints it once."""
    from llmcli import distributed

    if not distributed.record_error(message, hint, code):
        render.error(message, hint)
    return code
