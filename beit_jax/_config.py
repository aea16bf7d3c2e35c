"""Config fields that carry their own help, so one dataclass serves the Python API and the CLI
(`cli/options.add_config_flags` makes a flag of each field: `--field-name`, or `flag`)."""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Tuple


def option(default: Any, help: str, *, flag: Optional[str] = None, choices: Optional[Tuple[str, ...]] = None,
           minimum: Optional[int] = None, cli: bool = True):
    """A config field. flag: the CLI flag when not `--field-name` (a True-by-default bool's flag
    turns it off, e.g. `--no-progress`); choices: its allowed values; minimum: the smallest int it
    takes (checked when the CLI parses it); cli=False: Python only."""
    return dataclasses.field(default=default, metadata={"help": help, "flag": flag, "choices": choices,
                                                        "minimum": minimum, "cli": cli})
