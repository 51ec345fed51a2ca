"""
Configuration and user errors, shared by every script.

- Each script describes its settings as one dataclass. Values come from, in rising priority:
  the dataclass defaults < `--config preset.toml` (flat `key = value` lines) < `--key=value`.
- Configs are data (TOML), never executed code. `--help` lists every key with its default.
- A user error (missing file, bad value, unknown key) stops with one sentence that names the fix,
  not a traceback: raise `UserError` anywhere and the script's entry point prints it and exits 2.
"""

import dataclasses
import os
import sys
import tomllib
import typing


def setting(default, help):
    """A dataclass field with its --help text: `lr: float = setting(3e-4, "peak learning rate")`."""
    return dataclasses.field(default=default, metadata={"help": help})


class UserError(Exception):
    """A mistake the user can fix; the message is one sentence that says how."""


def run_main(main):
    """Call `main(sys.argv[1:])`, turning a UserError into one line on stderr and exit code 2."""
    try:
        main(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def _coerce(name, text, typ):
    """Turn the command-line string `text` into the type `typ` of field `name`."""
    if typing.get_origin(typ) in (typing.Union, getattr(__import__("types"), "UnionType", ())):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if text.lower() in ("none", "null", ""):
            return None
        typ = args[0]
    if typ is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise UserError(f"--{name} takes true or false, not {text!r}")
    try:
        return typ(text)
    except (TypeError, ValueError):
        raise UserError(f"--{name} takes a value of type {typ.__name__}, not {text!r}") from None


def _check_toml_value(name, value, typ):
    if typing.get_origin(typ) in (typing.Union, getattr(__import__("types"), "UnionType", ())):
        if value is None:
            return None
        typ = [a for a in typing.get_args(typ) if a is not type(None)][0]
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ in (bool, int, float, str) and not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise UserError(f"config key {name!r} needs a {typ.__name__}, not {value!r}")
    return value


def help_text(cls, prog):
    hints = typing.get_type_hints(cls)
    lines = [f"usage: {prog} [--config preset.toml] [--key=value ...]", "", "settings (default):"]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        typ = getattr(hints[f.name], "__name__", str(hints[f.name]))
        doc = f.metadata.get("help", "")
        lines.append(f"  --{f.name}={default!r:<14} ({typ}) {doc}".rstrip())
    return "\n".join(lines)


def parse_config(cls, argv, prog=None):
    """Build a `cls` instance from defaults, an optional TOML preset and `--key=value` arguments."""
    prog = prog or os.path.basename(sys.argv[0])
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    values = {}
    args = list(argv)
    if "-h" in args or "--help" in args:
        print(help_text(cls, prog))
        sys.exit(0)
    # --config first, whatever its position, so that command-line keys always win over the preset.
    rest = []
    while args:
        a = args.pop(0)
        if a == "--config" or a.startswith("--config="):
            path = a.split("=", 1)[1] if "=" in a else (args.pop(0) if args else "")
            if not os.path.isfile(path):
                raise UserError(f"config file {path!r} does not exist; pass the path of a TOML preset")
            with open(path, "rb") as f:
                try:
                    table = tomllib.load(f)
                except tomllib.TOMLDecodeError as e:
                    raise UserError(f"config file {path!r} is not valid TOML ({e}); fix that line") from None
            for k, v in table.items():
                if k not in names:
                    raise UserError(f"unknown config key {k!r} in {path}; run {prog} --help for the keys")
                values[k] = _check_toml_value(k, v, hints[k])
        else:
            rest.append(a)
    for a in rest:
        if not a.startswith("--"):
            raise UserError(f"unexpected argument {a!r}; settings are given as --key=value")
        key, eq, text = a[2:].partition("=")
        key = key.replace("-", "_")
        if key not in names:
            raise UserError(f"unknown config key {key!r}; run {prog} --help for the keys")
        if not eq:
            if hints[key] is bool:
                text = "true"
            else:
                raise UserError(f"--{key} needs a value: --{key}=VALUE")
        values[key] = _coerce(key, text, hints[key])
    return cls(**values)


def config_dict(cfg):
    """The settings as a plain dict (for checkpoints and logs)."""
    return dataclasses.asdict(cfg)
