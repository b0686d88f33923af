"""`diffusers-optim` console entry point: a thin dispatcher to each subcommand's `main(argv)`."""

from __future__ import annotations

import importlib
import sys

from diffusers_optim.errors import UserError

# subcommand -> (module, one-line help). Modules are imported only when their command runs.
COMMANDS = {
    "train": ("diffusers_optim.trainer", "train one UNet2DModel with any registered optimizer"),
    "compare": ("diffusers_optim.compare", "equal-budget comparison of several optimizers, with a report"),
    "optimizers": ("diffusers_optim.optim.table", "list registered optimizers, defaults and state memory"),
    "summarize": ("diffusers_optim.report", "rebuild summary and local report of a comparison folder"),
    "report": ("diffusers_optim.wandb_report", "build a W&B report for a group of runs"),
    "push": ("diffusers_optim.hub", "publish a finished run to the Hub (pipeline, model card, config, samples)"),
}


def usage() -> str:
    lines = ["usage: diffusers-optim COMMAND [flags]", "", "commands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`diffusers-optim COMMAND --help` shows a command's flags."]
    return "\n".join(lines)


def run_main(main_fn, argv: list[str]) -> int:
    """Run a command's main, turning UserError into one line on stderr and exit status 2."""
    try:
        return int(main_fn(argv) or 0)
    except UserError as err:
        if not getattr(err, "quiet", False):  # quiet: the main process of a distributed run reports it
            print(f"error: {err}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: {unknown_command_message(name)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return run_main(module.main, rest)


def unknown_command_message(name: str) -> str:
    from diffusers_optim.errors import unknown_choice

    return str(unknown_choice("command", name, COMMANDS))


if __name__ == "__main__":
    sys.exit(main())
