"""Config fields that carry their own help, so one dataclass serves the Python API and the CLI
(`cli/options.add_config_flags` makes a flag of each field: `--field-name`, or `flag`)."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Tuple


def option(default: Any, help: str, *, flag: Optional[str] = None, choices: Optional[Tuple[str, ...]] = None,
           minimum: Optional[int] = None, cli: bool = True):
    """A config field. flag: the CLI flag when not `--field-name` (a True-by-default bool's flag
    turns it off, e.g. `--no-progress`); choices: its allowed values; minimum: the smallest int it
    takes (checked when the CLI parses it); cli=False: Python only."""
    return dataclasses.field(default=default, metadata={"help": help, "flag": flag, "choices": choices,
                                                        "minimum": minimum, "cli": cli})


def check_numbers(config, non_negative: Tuple[str, ...]) -> list:
    """The problems shared by the training configs, one line each: fields that must be finite and
    >= 0, lr > 0, and the step counts (total_steps >= 1, grad_accum >= 1, warmup_steps >= 0)."""
    bad = []
    for name in non_negative:
        v = getattr(config, name)
        if not (math.isfinite(v) and v >= 0):
            bad.append(f"{name}={v} (must be a finite number >= 0)")
    if not config.lr > 0:
        bad.append(f"lr={config.lr} (must be > 0)")
    if config.total_steps < 1 or config.grad_accum < 1 or config.warmup_steps < 0:
        bad.append(f"steps={config.total_steps}, grad_accum={config.grad_accum}, warmup_steps={config.warmup_steps} "
                   f"(need steps >= 1, grad_accum >= 1, warmup_steps >= 0)")
    return bad
