"""
Configuration, user errors and progress display, shared by every script.

- Each script describes its settings as one dataclass. Values come from, in rising priority:
  the dataclass defaults < `--config preset.toml` (flat `key = value` lines) < `--key=value`.
- Configs are data (TOML), never executed code. `--help` lists every key with its default and the
  values it may take.
- A setting may declare its domain (`positive`, `at_least(0)`, `between(0, 1)`, `one_of(...)`): a
  value outside it is refused before any work, in one line that names the setting and the range.
- A user error (missing file, bad value, unknown key) stops with one sentence that names the fix,
  not a traceback: raise `UserError` anywhere and the script's entry point prints it and exits 2.
- `progress_bar` shows a long loop's progress: tqdm's bar on a terminal, plain lines in a log or pipe.
- Files are written whole or not at all (`atomic_path`, `write_atomic`): to a temporary name, then
  renamed into place, so a crash or a refused run never leaves a half-written file behind.
"""

import contextlib
import dataclasses
import hashlib
import math
import os
import shutil
import sys
import time
import tomllib
import types
import typing

from tqdm import tqdm


class Domain(typing.NamedTuple):
    """The values a setting may take: `test(value) -> bool`, and how --help and errors say it."""
    test: typing.Callable
    says: str


def at_least(low):
    return Domain(lambda v: v >= low, f"at least {low}")


def above(low):
    return Domain(lambda v: v > low, f"above {low}")


def between(low, high, low_open=False, high_open=False):
    """low <= v <= high; low_open / high_open leave out the end itself (a fraction below 1, say)."""
    says = f"{'above' if low_open else 'at least'} {low} and {'below' if high_open else 'at most'} {high}"
    return Domain(lambda v: (v > low if low_open else v >= low) and (v < high if high_open else v <= high), says)


def one_of(*choices):
    return Domain(lambda v: v in choices, "one of " + ", ".join(map(str, choices)))


positive = at_least(1)  # sizes, counts and steps
seed_range = between(0, 2**32 - 1)  # numpy's and torch's generators take any seed in this range


def setting(default, help, check=None):
    """A dataclass field with its --help text and, optionally, its domain (checked by parse_config):
    `lr: float = setting(3e-4, "peak learning rate", above(0))`. None always passes: it means unset."""
    return dataclasses.field(default=default, metadata={"help": help, "check": check})


class UserError(Exception):
    """A mistake the user can fix; the message is one sentence that says how."""


def run_main(main, argv=None):
    """Call `main(argv or sys.argv[1:])`, turning a UserError into one line on stderr and exit code 2."""
    try:
        main(sys.argv[1:] if argv is None else argv)
        sys.stdout.flush()  # so that a reader that went away shows here, not at interpreter exit
    except UserError as e:
        print("error: " + " ".join(str(e).splitlines()), file=sys.stderr)  # one line, whatever it quotes
        sys.exit(2)
    except BrokenPipeError:  # `script --help | head`: the reader stopped reading, which is no error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        sys.exit(141)  # what a Unix tool killed by SIGPIPE returns
    except KeyboardInterrupt:  # Ctrl-C: the user knows why it stopped; a traceback says nothing more
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def _is_union(typ):
    return typing.get_origin(typ) in (typing.Union, types.UnionType)


def _coerce(name, text, typ):
    """Turn the command-line string `text` into the type `typ` of field `name`."""
    if _is_union(typ):
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
        value = typ(text)
    except (TypeError, ValueError):
        raise UserError(f"--{name} takes a value of type {typ.__name__}, not {text!r}") from None
    if typ is float and not math.isfinite(value):
        raise UserError(f"--{name} takes a finite number, not {text!r}")
    return value


def _check_toml_value(name, value, typ):
    if _is_union(typ):
        if value is None:
            return None
        typ = [a for a in typing.get_args(typ) if a is not type(None)][0]
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ in (bool, int, float, str) and not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise UserError(f"config key {name!r} needs a {typ.__name__}, not {value!r}")
    if typ is float and not math.isfinite(value):
        raise UserError(f"config key {name!r} needs a finite number, not {value!r}")
    return value


def _check_domains(cfg):
    for f in dataclasses.fields(cfg):
        check, value = f.metadata.get("check"), getattr(cfg, f.name)
        if check is not None and value is not None and not check.test(value):
            raise UserError(f"--{f.name} must be {check.says}, not {value!r}")


def _type_name(typ):
    if _is_union(typ):
        return " or ".join("none" if a is type(None) else a.__name__ for a in typing.get_args(typ))
    return typ.__name__


HELP_KEY_WIDTH = 30


def help_text(cls, prog):
    """The usage line and one line per setting: --key=default, type, help, and the domain."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        check = f.metadata.get("check")
        doc = f.metadata.get("help", "") + (f" [{check.says}]" if check else "")
        rows.append((f"--{f.name}={default!r}", _type_name(hints[f.name]), doc))
    # A key wider than the column (a long default) gets a line of its own, so the columns stay aligned.
    key_width = min(max(len(r[0]) for r in rows), HELP_KEY_WIDTH)
    type_width = max(len(r[1]) for r in rows)
    lines = [f"usage: {prog} [--config preset.toml] [--key=value ...]", "", "settings (default):"]
    for key, typ, doc in rows:
        if len(key) > key_width:
            lines, key = lines + [f"  {key}"], ""
        lines.append(f"  {key:<{key_width}}  {typ:<{type_width}}  {doc}".rstrip())
    return "\n".join(lines)


def parse_config(cls, argv, prog=None):
    """Build a `cls` instance from defaults, an optional TOML preset and `--key=value` arguments,
    then check every setting against its domain."""
    prog = prog or os.path.basename(sys.argv[0])
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    values = {}
    args = list(argv)
    if "-h" in args or "--help" in args:
        print(help_text(cls, prog))
        sys.stdout.flush()  # inside run_main, which handles a closed pipe
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
                except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
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
    cfg = cls(**values)
    _check_domains(cfg)
    return cfg


def check_output_folder(path, key):
    """Refuse, before any work, an output folder that cannot be made: a file stands in its place."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"--{key}={path} cannot be a folder, as {existing} is a file; pass another --{key}")


def config_dict(cfg):
    """The settings as a plain dict (for checkpoints and logs)."""
    return dataclasses.asdict(cfg)


# ----------------------------------------------------------------------------------------------
# Files: written whole or not at all


def remove_path(path):
    """Delete a file or a folder, if it is there."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


@contextlib.contextmanager
def atomic_path(path):
    """A temporary name beside `path` to write a file or a folder to; when the block ends without an
    error it is renamed onto `path` (an old folder there is moved aside first, then deleted), and when
    it raises, it is deleted. Readers of `path` see the old version or the new one, never a part."""
    parent, name = os.path.split(os.path.abspath(path))
    tmp, old = os.path.join(parent, f".{name}.tmp{os.getpid()}"), os.path.join(parent, f".{name}.old{os.getpid()}")
    remove_path(tmp)
    try:
        yield tmp
        if os.path.isdir(tmp) and os.path.isdir(path):  # a folder cannot be renamed over a non-empty one
            os.replace(path, old)
        os.replace(tmp, path)
        remove_path(old)
    finally:
        remove_path(tmp)


def write_atomic(path, text):
    """Write a string, or an iterable of strings (streamed), to `path` whole or not at all."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for chunk in [text] if isinstance(text, str) else text:
            f.write(chunk)


def file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# ----------------------------------------------------------------------------------------------
# Progress of long loops


def progress_bar(iterable=None, *, total=None, desc, unit="it", initial=0, disable=False):
    """A progress display for a loop, with the part of tqdm's interface the scripts use (iterate,
    update, set_postfix, write, close). On a terminal it is tqdm's bar; anywhere else (a log file,
    a pipe) the bar's carriage-return updates would fill the file, so it prints plain lines instead:
    one every tenth of the way (at most one a second) or every 30 s, and one at the end."""
    if disable or sys.stderr.isatty():
        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, disable=disable,
                    dynamic_ncols=True)
    return ProgressLines(iterable, total, desc, unit, initial)


class ProgressLines:
    """Lines such as `train: step 1,200 of 4,800 (25%), loss 3.2100, 12.3 s, about 37 s left` on stderr."""
    MIN_SECONDS, MAX_SECONDS = 1.0, 30.0  # between two lines
    clock = time.perf_counter

    def __init__(self, iterable, total, desc, unit, initial=0):
        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n = self.shown_n = self.initial = initial
        self.postfix = ""
        self.start = self.shown_time = self.clock()

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update()
        self.close()

    def update(self, n=1):
        self.n += n
        now = self.clock()
        since = now - self.shown_time
        tenth_more = self.total and self.n * 10 // self.total > self.shown_n * 10 // self.total
        if (tenth_more and since >= self.MIN_SECONDS) or since >= self.MAX_SECONDS:
            self.show(now)

    def show(self, now):
        elapsed = now - self.start
        of = f" of {self.total:,} ({100 * self.n // self.total}%)" if self.total else ""
        line = f"{self.desc}: {self.unit} {self.n:,}{of}{self.postfix}, {elapsed:.1f} s"
        done = self.n - self.initial
        left = elapsed / done * (self.total - self.n) if self.total and done > 0 else 0
        if left >= 1:
            line += f", about {left:.0f} s left"
        print(line, file=sys.stderr, flush=True)
        self.shown_n, self.shown_time = self.n, now

    def set_postfix(self, **values):
        self.postfix = "".join(f", {k} {v}" for k, v in values.items())

    def write(self, text):
        print(text, flush=True)

    def close(self):
        if self.n != self.shown_n:
            self.show(self.clock())
