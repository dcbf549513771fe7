"""Flag values, from the command line or from a TOML file of flags.

The argparse types here check a value where it is given, so that a bad one is
refused naming its flag. `read_flag_file` reads `p2p-node start --config FILE`:
each key is a flag's long name without its dashes (`model-memory-mb = 512`), and
its value goes through the same type as on the command line. A repeatable flag
takes a list (`listen = ["/ip4/0.0.0.0/tcp/4001"]`), a switch `true` or
`false`, a path a string (`~` expanded; relative paths are taken from the
current directory, as on the command line).
"""

from __future__ import annotations

import argparse
import math
import tomllib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._config import ConfigError, GossipConfig, check_peer_id, parse_multiaddr, parse_peer_multiaddr


class FlagFileError(ValueError):
    """A flag file is unusable; the message names the file and the key at fault."""


@dataclass(frozen=True, slots=True)
class Number:
    """An argparse type: a finite int (or float, when not `integer`) at least `least`,
    or, with `above`, greater than `above`."""

    integer: bool
    least: float | None = None
    above: float | None = None

    def __call__(self, text: str) -> float:
        try:
            value = int(text) if self.integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {self._kind}, got {text!r}") from None
        return self._check(value)

    def from_toml(self, value: object) -> float:
        """A TOML value: an integer, or for a float also a float (never a string or a bool)."""
        number_types = (int,) if self.integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, number_types):
            raise argparse.ArgumentTypeError(f"expected {self._kind}, got {value!r}")
        return self._check(value if self.integer else float(value))

    def _check(self, value: float) -> float:
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {value}")
        if self.least is not None and value < self.least:
            raise argparse.ArgumentTypeError(f"must be >= {self.least:g}, got {value:g}")
        if self.above is not None and not value > self.above:
            raise argparse.ArgumentTypeError(f"must be > {self.above:g}, got {value:g}")
        return value

    @property
    def _kind(self) -> str:
        return "an integer" if self.integer else "a number"


COUNT = Number(integer=True, least=1)  # workers, rows, streams...
POSITIVE = Number(integer=False, above=0)  # seconds, MB, jobs/s


def multiaddr_text(text: str) -> str:
    """An argparse type: a multiaddr, kept as text."""
    return _checked(parse_multiaddr, text)


def peer_multiaddr_text(text: str) -> str:
    """An argparse type: a multiaddr ending in /p2p/<peer id>, kept as text."""
    return _checked(parse_peer_multiaddr, text)


def peer_id_text(text: str) -> str:
    """An argparse type: a peer id (`12D3KooW...`)."""
    return _checked(check_peer_id, text)


def network_name(text: str) -> str:
    """An argparse type: a network name, by GossipConfig's own rule."""
    return _checked(lambda name: GossipConfig(network=name), text)


def _checked(check: Callable[[str], object], text: str) -> str:
    try:
        check(text)
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


# --- the file --------------------------------------------------------------------------


def read_flag_file(path: Path, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The flags of `parser` that the TOML file at `path` sets: {dest: value}, each
    value as the command line would give it. FlagFileError names the file and the
    first key at fault: one unknown (`--help` and `--config` are not keys), or a
    value of the wrong type or out of range."""
    try:
        with path.open("rb") as f:
            document = tomllib.load(f)
    except OSError as error:
        raise FlagFileError(f"cannot read config file {path}: {error.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise FlagFileError(f"config file {path} is not valid TOML: {error}") from None
    options = dict(_file_options(parser))
    values = {}
    for key, value in document.items():
        action = options.get(key)
        if action is None:
            dashed = key.replace("_", "-")
            hint = f" (did you mean {dashed!r}?)" if dashed in options else ""
            raise FlagFileError(f"config file {path}: unknown key {key!r}{hint}")
        try:
            values[action.dest] = _file_value(action, value)
        except (argparse.ArgumentTypeError, ValueError, TypeError) as error:
            raise FlagFileError(f"config file {path}: {key}: {error}") from None
    return values


def file_keys(parser: argparse.ArgumentParser) -> list[str]:
    """Every key a flag file for `parser` may hold."""
    return [key for key, _ in _file_options(parser)]


def _file_options(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.Action]]:
    # argparse lists a parser's options only in `_actions`.
    for action in parser._actions:
        if action.dest in ("help", "config"):
            continue
        for option in action.option_strings:
            if option.startswith("--"):
                yield option.removeprefix("--"), action


def _file_value(action: argparse.Action, value: object) -> Any:
    if action.nargs == 0:  # a switch: --mdns
        if not isinstance(value, bool):
            raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")
        return value
    if isinstance(action, argparse._AppendAction):  # a repeatable flag
        if not isinstance(value, list):
            raise argparse.ArgumentTypeError(
                f"expected a list (the flag is repeatable), got {value!r}"
            )
        return [_file_scalar(action, item) for item in value]
    return _file_scalar(action, value)


def _file_scalar(action: argparse.Action, value: object) -> Any:
    kind = action.type
    if isinstance(kind, Number):
        converted: Any = kind.from_toml(value)
    elif not isinstance(value, str):
        raise argparse.ArgumentTypeError(f"expected a string, got {value!r}")
    elif kind is Path:
        converted = Path(value).expanduser()
    elif callable(kind):
        converted = kind(value)
    else:
        converted = value
    if action.choices is not None and converted not in action.choices:
        choices: Sequence[Any] = list(action.choices)
        raise argparse.ArgumentTypeError(
            f"expected one of {', '.join(map(str, choices))}, got {value!r}"
        )
    return converted


def without_defaults(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`parser`, changed so that a parse holds only the flags given: every option's
    default (its subcommands' too) is argparse.SUPPRESS."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                without_defaults(command)
        elif action.option_strings:
            action.default = argparse.SUPPRESS
    return parser
