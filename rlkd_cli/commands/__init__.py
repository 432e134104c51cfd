"""One thin module per subcommand: take the composed config, resolve the inputs, call the library.

Each module has ``run(cfg, run_dir) -> dict`` (the Hydra commands; ``report`` is a plain Typer
command): it checks the config against its schema (:mod:`rlkd_cli.schema`), builds the process's
:class:`~rlkd_cli.runtime.Runtime`, the tokenizer and the teacher source, and hands them to the
engine or the measuring code.
"""
