"""Settings declared once, reaching config file, environment and flags.

Each daemon (transocks, usocksd) lists its `Setting`s; `Config` builds one
configargparse parser from them, so `--help` is the reference manual, the file
key is the setting name, the environment variable is ``<PREFIX>_<NAME>`` and the
flag is ``--name-with-dashes``.  Precedence: command line > environment > file >
built-in default.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import configargparse

import transocks


class ConfigError(Exception):
    """A setting could not be parsed or validated; the message names it."""


@dataclasses.dataclass(frozen=True)
class Setting:
    """One configuration setting, the single place it is declared."""

    name: str
    type: Callable[[str], Any]
    default: Any
    help: str
    section: str = "general"
    multiple: bool = False
    short: str | None = None
    metavar: str | None = None
    reload: bool = True
    """False when a HUP cannot apply the change (e.g. user/group)."""
    split: bool = True
    """For `multiple`: whether one item may list several values ("a, b c"); False for
    items that contain spaces themselves (a rule, a pool), one per line or flag."""
    required: bool = False
    """For `multiple`: an empty list (`listen =`) is refused rather than meaning none."""

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def env_var(self, prefix: str) -> str:
        return f"{prefix}_{self.name.upper()}"

    def convert(self, raw: Any) -> Any:
        """Convert a raw string (or list of strings for `multiple`)."""
        if self.multiple:
            items = raw if isinstance(raw, list) else [raw]
            out: list[Any] = []
            for item in items:
                out.extend(self.convert_item(item))
            return out
        return self.type(raw) if isinstance(raw, str) else raw

    def convert_item(self, item: str) -> list[Any]:
        """The values of one item of a `multiple` setting (one file line, flag or env entry)."""
        parts = split_list(item) if self.split else [item.strip()]
        return [self.type(p) for p in parts if p]

    def env_items(self, value: str) -> list[str]:
        """A `multiple` setting's environment value as items: unsplit ones are one per line or `;`."""
        if self.split:
            return [value]
        return [p for p in value.replace(";", "\n").splitlines() if p.strip()]


def split_list(value: str) -> list[str]:
    """Split "a, b c" into ["a", "b", "c"] (file and env lists)."""
    return [p for p in value.replace(",", " ").split() if p]


# --- value types ------------------------------------------------------------


def boolean(value: str) -> bool:
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true/false, got {value!r}")


AUTO = "auto"


def auto_boolean(value: str) -> bool | str:
    """true/false, or AUTO: let the daemon find out."""
    if str(value).strip().lower() == AUTO:
        return AUTO
    try:
        return boolean(value)
    except ValueError:
        raise ValueError(f"expected auto, true or false, got {value!r}") from None


auto_boolean.__name__ = "auto|true|false"


def finite(value: str | float) -> float:
    """A number that is neither nan nor infinite: every numeric setting reads through here.

    float() accepts "nan", "inf" and "1e999"; a timeout of nan never fires
    (every comparison with it is false) and one of inf never ends."""
    f = float(value)
    if not math.isfinite(f):
        raise ValueError(f"expected a finite number, got {value!r}")
    return f


def seconds(value: str) -> float:
    """A duration in seconds; 0 or "off" disables."""
    v = str(value).strip().lower()
    if v in ("off", "none", "0"):
        return 0.0
    mult = 1.0
    for suffix, m in (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        if v.endswith(suffix):
            v, mult = v[: -len(suffix)], m
            break
    f = finite(float(v) * mult)
    if f < 0:
        raise ValueError("must not be negative")
    return f


def size(value: str) -> int:
    """A byte size with optional K/M/G suffix; 0 disables."""
    v = str(value).strip().upper().rstrip("B").rstrip("I")
    mult = 1
    for suffix, m in (("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30)):
        if v.endswith(suffix):
            v, mult = v[:-1], m
            break
    n = int(finite(float(v) * mult))
    if n < 0:
        raise ValueError("must not be negative")
    return n


def positive_int(value: str) -> int:
    n = int(value)
    if n < 1:
        raise ValueError("must be at least 1")
    return n


def non_negative_int(value: str) -> int:
    n = int(value)
    if n < 0:
        raise ValueError("must not be negative")
    return n


def choice(*allowed: str) -> Callable[[str], str]:
    def convert(value: str) -> str:
        v = str(value).strip().lower()
        if v not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}")
        return v

    convert.__name__ = "one of " + "|".join(allowed)
    return convert


def optional_str(value: str) -> str | None:
    v = str(value).strip()
    return v or None


_URL_PASSWORD = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^/@\s:]*:)[^@\s]*@")


def redact(text: str) -> str:
    """The text with every URL's password replaced by ***: config errors echo values."""
    return _URL_PASSWORD.sub(r"\1***@", text)


# --- parser -----------------------------------------------------------------

_LINE = re.compile(r"^\s*([A-Za-z0-9_-]+)\s*(?:[:=]\s*|\s+|$)(.*?)\s*$")
_TRAILING_COMMENT = re.compile(r"(?:^|\s+)#.*$")
"""`value   # why`: a `#` after whitespace starts a comment (a quoted value keeps its `#`)."""


@dataclass(frozen=True)
class FileItem:
    line: int
    value: str


def _file_value(text: str) -> str:
    """A value as written after `=`: quotes taken off (what is inside is kept, `#` too), then a
    `  # comment` after it dropped."""
    if text and text[0] in "'\"":
        end = text.find(text[0], 1)
        if end > 0 and not _TRAILING_COMMENT.sub("", text[end + 1:]).strip():
            return text[1:end]
    return _TRAILING_COMMENT.sub("", text)


def parse_file(text: str, name: str, settings: dict[str, Setting]) -> dict[str, list[FileItem]]:
    """`key = value` (or `key: value`) lines; `#`/`;` comment lines, `  # comments` after a value and
    `[section]` lines are skipped.

    A `multiple` setting may be given on several lines (they add up, in order);
    any other setting given twice keeps the last.  Unknown keys are refused
    with the file and line.
    """
    out: dict[str, list[FileItem]] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped[0] in "#;" or (stripped[0] == "[" and stripped[-1] == "]"):
            continue
        m = _LINE.match(raw)
        if m is None:
            raise ConfigError(f"{name}: cannot read {redact(stripped)!r} (line {lineno}; expected name = value)")
        key, value = m.group(1), _file_value(m.group(2))
        norm = key.lstrip("-").replace("-", "_")
        setting = settings.get(norm)
        if setting is None:
            raise ConfigError(f"{name}: unknown setting {key!r} (line {lineno})")
        # A bare `flag =` turns a boolean on; other empty values go to their type (`user =` is none,
        # `sniff_ports =` an empty list), never as "true".
        item = FileItem(lineno, value if value or setting.type not in (boolean, auto_boolean) else "true")
        if setting.multiple:
            out.setdefault(norm, []).append(item)
        else:
            out[norm] = [item]
    return out


class _ArgParser(configargparse.ArgParser):
    def get_possible_config_keys(self, action: argparse.Action) -> list[str]:
        keys = super().get_possible_config_keys(action)
        if action.option_strings and action.dest:
            keys.append(action.dest)
        return keys

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(redact(message))


class _MisplacedCommand(argparse.Action):
    """A command flag (or an abbreviation, or --flag=value) that reached the settings parser:
    refuse it rather than start the daemon without doing what was asked."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        parser.error(f"{self.option_strings[0]} must be the first argument, spelled out")


@dataclass(frozen=True)
class Command:
    """A one-shot action of the daemon's executable (e.g. `usocksd --hash-password`):
    listed in --help with the settings, run instead of the daemon."""

    flag: str  # "--name", or a bare word for a subcommand ("rules")
    usage: str  # what follows the flag
    help: str
    run: Callable[[list[str]], int]  # gets the arguments after the flag, returns the exit code


class Config:
    """Effective settings for one daemon, loaded from argv, env and file."""

    def __init__(
        self,
        prog: str,
        settings: Iterable[Setting],
        env_prefix: str,
        default_config: str,
        description: str = "",
        validate: Callable[[Config], None] | None = None,
        commands: Sequence[Command] = (),
    ) -> None:
        self.prog = prog
        self.env_prefix = env_prefix
        self.default_config = default_config
        self.description = description
        self.settings: dict[str, Setting] = OrderedDict((s.name, s) for s in settings)
        self._validate = validate
        self.commands = {c.flag: c for c in commands}
        self.values: dict[str, Any] = {}
        self.sources: dict[str, str] = {}
        self.item_sources: dict[str, list[str]] = {}
        """For `multiple` settings: where each value came from (`FILE (line N)`, `--flag`, ...)."""
        self.config_file: str | None = None
        self.argv: list[str] = []
        self.check_config = False
        self.print_config = False

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["values"][name]
        except KeyError:
            raise AttributeError(name) from None

    def build_parser(self) -> _ArgParser:
        parser = _ArgParser(
            prog=self.prog,
            description=self.description,
            config_file_parser_class=configargparse.DefaultConfigFileParser,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
            add_config_file_help=False,
            add_env_var_help=False,
            epilog=(
                f"Every setting can be given as a flag, as the environment variable "
                f"{self.env_prefix}_<NAME> or as `name = value` in the config file "
                f"(default {self.default_config} when it exists). Precedence: flag > "
                "environment > file > default. Durations accept ms/s/m/h suffixes, "
                "sizes K/M/G; 0 or off disables."
            ),
        )
        parser.add_argument(
            "-c",
            "--config",
            metavar="FILE",
            help=f"configuration file (default: {self.default_config} if it exists)",
        )
        parser.add_argument(
            "--check-config",
            action="store_true",
            help="validate the configuration and exit (0 when valid)",
        )
        parser.add_argument(
            "--print-config",
            action="store_true",
            help="print every effective value and where it came from, then exit",
        )
        parser.add_argument("--version", action="version", version=f"{self.prog} {transocks.__version__}",
                            help="print the version and exit")
        if self.commands:
            words = [c for c in self.commands.values() if not c.flag.startswith("-")]
            width = max((len(c.flag) for c in words), default=0)
            group = parser.add_argument_group(
                f"commands (run instead of the daemon; must come first; `{self.prog} COMMAND --help` for more)",
                "\n".join(f"  {c.flag.ljust(width)}  {c.help}" for c in words) or None)
            for c in self.commands.values():
                if c.flag.startswith("-"):
                    group.add_argument(c.flag, nargs=argparse.REMAINDER, action=_MisplacedCommand,
                                       help=f"{c.usage}: {c.help}")
        groups: dict[str, argparse._ArgumentGroup] = {}
        for s in self.settings.values():
            group = groups.get(s.section) or parser.add_argument_group(s.section)
            groups[s.section] = group
            flags = [s.short, s.flag] if s.short else [s.flag]
            kwargs: dict[str, Any] = dict(
                dest=s.name,
                env_var=s.env_var(self.env_prefix),
                help=f"{s.help} [env {s.env_var(self.env_prefix)}]",
                metavar=s.metavar or s.name.upper(),
            )
            if s.multiple:
                kwargs.update(action="append", default=None)
            else:
                kwargs.update(default=argparse.SUPPRESS)
            group.add_argument(*flags, **kwargs)
            # Show the real default in --help without argparse applying it,
            # so we can tell "given" from "defaulted".
            parser._actions[-1].help = (
                f"{s.help} (default: {_show(s.default)}) "
                f"[env {s.env_var(self.env_prefix)}]"
            )
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
        # The daemon's form (its settings are listed below) and each command's, as `git --help` shows its verbs.
        forms = [f"{self.prog} [-h] [--version] [-c FILE] [--check-config] [--print-config] [SETTINGS]"]
        forms += [f"{self.prog} {c.flag} {c.usage}" for c in self.commands.values()]
        parser.usage = "\n       ".join(forms).replace("%", "%%")
        return parser

    def run_command(self, argv: Sequence[str]) -> int | None:
        """Run the command argv starts with and return its exit code; None when it is not one.

        A command flag after other arguments is an error rather than a
        daemon start that would ignore it.
        """
        if argv:
            flag, eq, value = argv[0].partition("=")
            if flag in self.commands:
                return self.commands[flag].run([value, *argv[1:]] if eq else list(argv[1:]))
        misplaced = [a for a in argv if a.startswith("-") and a.partition("=")[0] in self.commands]
        if misplaced:
            raise ConfigError(f"{misplaced[0]} must be the first argument")
        return None

    def load(self, argv: Sequence[str], env: dict[str, str] | None = None) -> Config:
        """Parse argv/env/file into values; raises ConfigError with a clear message."""
        env = dict(os.environ if env is None else env)
        self.argv = list(argv)
        parser = self.build_parser()
        # Flags only (--help and --version answer even when the file is unreadable); the file and the
        # environment are read below, with their lines and names.
        ns = parser.parse_args(_strip_config_arg(self.argv), env_vars={})
        config_path = _find_config_arg(self.argv) or env.get(f"{self.env_prefix}_CONFIG")
        if config_path is None and os.path.exists(self.default_config):
            config_path = self.default_config
        file_text = None
        if config_path is not None:
            try:
                with open(config_path, encoding="utf-8") as f:
                    file_text = f.read()
            except OSError as exc:
                raise ConfigError(f"cannot read config file {config_path}: {exc.strerror}") from None
        self.config_file = config_path
        file_items: dict[str, list[FileItem]] = {}
        if file_text is not None:
            file_items = parse_file(file_text, config_path, self.settings)
        self.check_config = bool(getattr(ns, "check_config", False))
        self.print_config = bool(getattr(ns, "print_config", False))
        values: dict[str, Any] = {}
        sources: dict[str, str] = {}
        item_sources: dict[str, list[str]] = {}
        for s in self.settings.values():
            env_name = s.env_var(self.env_prefix)
            raw_flag = getattr(ns, s.name, None)
            if _flag_given(self.argv, s) and raw_flag is not None:
                source = "command line"
                raws = [(s.flag, "", r) for r in (raw_flag if s.multiple else [raw_flag])]
            elif env_name in env:
                source = f"environment {env_name}"
                raws = [(env_name, "", r) for r in (s.env_items(env[env_name]) if s.multiple else [env[env_name]])]
            elif s.name in file_items:
                source = f"file {config_path}"
                raws = [(str(config_path), f" (line {it.line})", it.value) for it in file_items[s.name]]
            else:
                values[s.name] = list(s.default) if s.multiple else s.default
                sources[s.name] = "default"
                item_sources[s.name] = ["default"] * len(values[s.name]) if s.multiple else []
                continue
            converted: list[Any] = []
            origins: list[str] = []
            for where, line, raw in raws:
                try:
                    if s.multiple:
                        got = s.convert_item(raw)
                    else:
                        got = [s.type(raw)]
                except (ValueError, TypeError) as exc:
                    raise ConfigError(redact(f"{where}: {s.name} = {raw!r}{line}: {exc}")) from None
                converted.extend(got)
                origins.extend([where + line] * len(got))
            if s.multiple and s.required and not converted:
                raise ConfigError(f"{raws[-1][0]}: {s.name} needs at least one value")
            values[s.name] = converted if s.multiple else converted[0]
            sources[s.name] = source
            item_sources[s.name] = origins
        self.values = values
        self.sources = sources
        self.item_sources = item_sources
        if self._validate is not None:
            try:
                self._validate(self)
            except ConfigError as exc:
                raise ConfigError(redact(str(exc))) from None
        return self

    def format(self) -> str:
        """Every effective value and where it came from (for --print-config)."""
        width = max(len(n) for n in self.settings)
        lines = [f"# config file: {self.config_file or '(none, built-in defaults)'}"]
        for name in self.settings:
            value = self.values[name]
            shown = ", ".join(map(str, value)) if isinstance(value, list) else _show(value)
            lines.append(f"{name.ljust(width)} = {shown}    # {self.sources[name]}")
        return "\n".join(lines)

    def help_text(self) -> str:
        return self.build_parser().format_help()


def _show(value: Any) -> str:
    if value is None:
        return "(none)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value)) or "(none)"
    if isinstance(value, float) and value == 0:
        return "off"
    return str(value)


def _find_config_arg(argv: Sequence[str]) -> str | None:
    found = None
    for i, a in enumerate(argv):
        if a in ("-c", "--config") and i + 1 < len(argv):
            found = argv[i + 1]
        elif a.startswith("--config="):
            found = a.split("=", 1)[1]
        elif a.startswith("-c") and len(a) > 2:
            found = a[2:]
    return found


def _strip_config_arg(argv: Sequence[str]) -> list[str]:
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("-c", "--config"):
            skip = True
            continue
        if a.startswith("--config=") or (a.startswith("-c") and len(a) > 2 and not a.startswith("--")):
            continue
        out.append(a)
    return out


def _flag_given(argv: Sequence[str], s: Setting) -> bool:
    names = [s.flag] + ([s.short] if s.short else [])
    return any(a == n or a.startswith(n + "=") for a in argv for n in names)


def exit_on_error(func: Callable[[], Config]) -> Config:
    """Run a config load at start-up; print the error and exit 2 as argparse would."""
    try:
        return func()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
