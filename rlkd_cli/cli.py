"""The ``rlkd`` command: Typer subcommands that hand their arguments to Hydra (:mod:`rlkd_cli.hydra_run`).

Each Hydra subcommand composes ``conf/<command>.yaml`` with the user's overrides and runs
``rlkd_cli.commands.<command>.run``; ``report`` is a plain command. ``rlkd --help`` lists the
commands and the config groups; ``rlkd <command> --help`` is Hydra's help for that command.
"""

from __future__ import annotations

from pathlib import Path

import typer

from rlkd_cli.config import groups_help
from rlkd_cli.errors import RlkdError

_EPILOG = (
    "Each command takes Hydra overrides: group=option, key=value, -m for sweeps, --cfg job to print the config, "
    "--help for the command's config, --debug for tracebacks.\n\n"
    "Config groups and their options:\n\n" + groups_help().replace("\n", "\n\n")
)

app = typer.Typer(
    name="rlkd",
    help="Knowledge distillation of causal LMs with the RLKD ranking loss (Peng & Zhang, COLING 2025).",
    epilog=_EPILOG,
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)

_PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}

#: command name -> (module in rlkd_cli.commands, one-line help)
HYDRA_COMMANDS = {
    "sft": ("sft", "Fine-tune one model with cross-entropy (teachers, or the SFT baseline with model=student)."),
    "distill": ("distill", "Distil the teacher into the student (default loss: kl+rank, the paper's mix)."),
    "cache-teacher": ("cache_teacher", "Run the teacher once and store its top-K logits per response position "
                                       "(for distill teacher.cache=PATH)."),
    "measure-alignment": ("measure_alignment", "CR@k, OR@k, top-1 agreement and perplexities of checkpoints=[...] "
                                               "against the teacher."),
    "evaluate": ("evaluate", "Downstream metrics (accuracy, ROUGE-L, perplexity) of a model or checkpoints, or of a "
                             "predictions file."),
    "generate": ("generate", "Write a model's responses to a dataset's prompts as JSON Lines (dataset=jsonl reads them "
                             "back: offline SeqKD, or samples to inspect)."),
}


def _hydra_command(name: str, module: str, help_text: str) -> None:
    def command(ctx: typer.Context) -> None:
        from rlkd_cli.hydra_run import command_task, run_hydra

        run_hydra(name, command_task(module), list(ctx.args))

    command.__doc__ = help_text + " --help for its config."
    # short_help: the command list shows the whole line (wrapped), not Click's first 45 characters
    app.command(name, context_settings=_PASS_THROUGH, add_help_option=False, short_help=help_text)(command)


for _name, (_module, _help) in HYDRA_COMMANDS.items():
    _hydra_command(_name, _module, _help)


_REPORT_HELP = "Tables and plots over runs and sweeps: mean ± std over seeds per swept setting, curves, by-modes split."


@app.command(short_help=_REPORT_HELP)
def report(
    paths: list[Path] = typer.Argument(..., help="run or sweep folders (searched recursively for runs)"),
    out: Path = typer.Option(None, "--out", help="where report.md, report.csv and the plots go (default: the first PATH)"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
) -> None:
    """Tables and plots over runs and sweeps: mean ± std over seeds per swept setting, curves, by-modes split."""
    from rich.console import Console

    import logging
    import sys

    from rlkd_cli.commands.report import write_report
    from rlkd_cli.hydra_run import _one_line

    handler = logging.StreamHandler(sys.stderr)  # skipped lines and damaged files: one "warning:" line each
    handler.setFormatter(logging.Formatter("warning: %(message)s"))
    report_log = logging.getLogger("rlkd.report")
    report_log.handlers, report_log.propagate = [handler], False
    report_log.setLevel(logging.INFO)
    try:
        console = Console(highlight=False, soft_wrap=False)
        if not console.is_terminal:  # logs and pipes: no 80-column squeeze
            console = Console(highlight=False, soft_wrap=False, width=200)
        write_report(paths, out, console=console)
    except RlkdError as ex:
        raise typer.Exit(_one_line(ex, debug))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
