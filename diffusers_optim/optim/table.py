"""`diffusers-optim optimizers`: the registry as a table, with measured optimizer-state memory."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
from typing import Any

import torch

from diffusers_optim.errors import UserError
from diffusers_optim.optim.factory import create_optimizer
from diffusers_optim.optim.memory import optimizer_state_bytes
from diffusers_optim.optim.registry import OptimizerSpec, get_spec, list_optimizers

logger = logging.getLogger(__name__)
FLAGS = ("has_betas", "has_momentum", "has_eps", "has_weight_decay", "needs_train_eval", "lr_is_multiplier",
         "schedule_free", "needs_cuda")


def state_bytes_per_param(name: str, resolution: int = 16) -> float:
    """Optimizer-state bytes per model parameter after one step on the tiny UNet."""
    from diffusers_optim.models import build_unet

    model = build_unet("tiny", resolution, 1, init_seed=0)
    with contextlib.redirect_stdout(io.StringIO()):  # some optimizers print at init; keep --json clean
        optimizer = create_optimizer(model, name)
    if get_spec(name).needs_train_eval:
        optimizer.train()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, resolution, resolution, generator=generator)
    model(x, torch.tensor([10, 500])).sample.square().mean().backward()
    optimizer.step()
    return optimizer_state_bytes(optimizer) / sum(p.numel() for p in model.parameters())


def describe(spec: OptimizerSpec, measure: bool = True) -> dict[str, Any]:
    """One row of the table as plain data."""
    installed = spec.is_available()
    row: dict[str, Any] = {
        "name": spec.name,
        "aliases": list(spec.aliases),
        "package": spec.package or "core",
        "installed": installed,
        "defaults": {k: list(v) if isinstance(v, tuple) else v for k, v in spec.defaults.items()},
        "flags": [flag for flag in FLAGS if getattr(spec, flag)]
        + (["param_routing"] if spec.param_routing else [])
        + ([] if spec.exact_resume else ["inexact_resume"]),
        "description": spec.description,
        "defaults_source": spec.defaults_source,
        "state_bytes_per_param": None,
    }
    if measure and installed and (torch.cuda.is_available() or not spec.needs_cuda):
        try:
            row["state_bytes_per_param"] = round(state_bytes_per_param(spec.name), 3)
        except Exception as err:  # noqa: BLE001 - one broken entry must not hide the others
            logger.warning("could not measure '%s': %s: %s", spec.name, type(err).__name__, err)
    return row


def format_table(rows: list[dict[str, Any]]) -> str:
    """Fixed-width text table."""
    header = ("name", "package", "installed", "state B/param", "flags", "defaults")
    lines = []
    for row in rows:
        name = row["name"] + (f" ({', '.join(row['aliases'])})" if row["aliases"] else "")
        state = "-" if row["state_bytes_per_param"] is None else f"{row['state_bytes_per_param']:.2f}"
        defaults = ", ".join(f"{k}={v}" for k, v in row["defaults"].items())
        lines.append(
            (
                name,
                row["package"],
                "yes" if row["installed"] else "no",
                state,
                ",".join(row["flags"]),
                defaults,
            )
        )
    widths = [max(len(str(line[i])) for line in [header, *lines]) for i in range(len(header) - 1)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
    return "\n".join(fmt.format(*line) for line in [header, *lines])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="diffusers-optim optimizers", description=__doc__)
    parser.add_argument("--pattern", default=None, help="fnmatch filter on names, e.g. 'adam*'")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--no_measure", action="store_true", help="skip the one-step state-memory measurement"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one step of a tiny UNet: more threads only add overhead
    names = list_optimizers(args.pattern)
    if not names:
        raise UserError(
            f"no optimizer matches --pattern '{args.pattern}'. Valid: {', '.join(list_optimizers())}"
        )
    rows = [describe(get_spec(name), measure=not args.no_measure) for name in names]
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))
    return 0
