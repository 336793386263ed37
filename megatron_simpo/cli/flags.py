"""Command lines generated from typed config dataclasses, and the one way a command ends.

A field's type gives the flag's type and choices (``Literal``; ``tuple[int, ...]`` takes one or
more values, as Megatron-LM's list flags do), its attribute docstring the help
text, and its default the "(default: ...)" shown in ``--help``. Parsing keeps only the flags the
user gave (``argparse.SUPPRESS``), so the dataclass builds itself from them and its own defaults:
no default is written twice. Every console script parses through :class:`Command` (or, for
training, the same :class:`Section` s) and ends through :func:`run_command`: a user's mistake is
one ``<prog>: error: ...`` line from rank 0 and exit code 2.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import functools
import inspect
import os
import re
import sys
import textwrap
import types
import typing
from dataclasses import dataclass
from typing import Callable, Mapping, NoReturn, Sequence, TypeVar

from megatron_simpo.distributed.files import write_text_atomically

T = TypeVar("T")
USER_ERRORS = (ValueError, FileNotFoundError)
"""What a command reports as the user's mistake (exit code 2) unless it says otherwise."""


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass: the string literal under each annotated field."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def _unwrap_optional(annotation):
    """``X | None`` -> X (the flag's type); anything else unchanged."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


@dataclass(frozen=True)
class Section:
    """A help group of flags for fields of one dataclass.

    Args:
        title: the help group's title.
        cls: the dataclass whose fields the flags set.
        fields: those fields, in help order.
        names: field -> flag name(s) where they differ from ``--field-name``; the first is the
            canonical name, the others aliases.
        key: where the built dataclass goes (the caller's name for it; also the flags' dest prefix).
        trigger: for a dataclass that is absent unless asked for (FP8): the field whose flag
            asks for it; its other flags are refused without that one.
        positional: fields given as positional arguments (named as the field), not flags.
        notes: field -> text appended to its help (values computed elsewhere, e.g. a table).
    """

    title: str
    cls: type
    fields: tuple[str, ...]
    key: str
    names: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    trigger: str | None = None
    positional: tuple[str, ...] = ()
    notes: dict[str, str] = dataclasses.field(default_factory=dict)

    def flag(self, name: str) -> str:
        return self.names.get(name, ("--" + name.replace("_", "-"),))[0]

    def dest(self, name: str) -> str:
        return f"{self.key}.{name}"

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group(self.title)
        hints = typing.get_type_hints(self.cls)
        docs = field_docs(self.cls)
        fields = {f.name: f for f in dataclasses.fields(self.cls)}
        for name in self.fields:
            spec = fields[name]
            flags = self.names.get(name, ("--" + name.replace("_", "-"),))
            kind = _unwrap_optional(hints[name])
            required = (spec.default is dataclasses.MISSING
                        and spec.default_factory is dataclasses.MISSING)
            default = None if required else spec.default
            text = " ".join(filter(None, (docs.get(name, ""), self.notes.get(name))))
            options = dict(dest=self.dest(name), default=argparse.SUPPRESS)
            if kind is bool and hints[name] is not bool:
                # bool | None: None lets the dataclass decide; --x sets True, --no-x False.
                group.add_argument(*flags, action=argparse.BooleanOptionalAction,
                                   help=text, **options)
                continue
            if kind is bool:
                # A flag switches the dataclass default: --x sets True, --no-x sets False.
                value = not flags[0].startswith("--no-")
                if spec.default is True:  # the help speaks of the field; say what the flag does
                    note = "(default: on; this flag turns it off)" if not value else "(default: True)"
                    text = f"{text} {note}" if text else note
                group.add_argument(*flags, action="store_const", const=value,
                                   help=text, **options)
                continue
            if typing.get_origin(kind) is typing.Literal:
                choices = typing.get_args(kind)
                options.update(choices=choices, type=type(choices[0]))
            elif kind in (int, float, str):
                options.update(type=kind)
            elif _is_value_tuple(kind):  # tuple[int, ...]: Megatron-LM's nargs='+' lists
                options.update(type=typing.get_args(kind)[0], nargs="+")
            else:
                raise TypeError(f"{self.cls.__name__}.{name}: no flag for type {kind!r}")
            if default is not None and not required:
                text = f"{text} (default: {default})" if text else f"(default: {default})"
            if name in self.positional:  # the dest doubles as its name; shown as the field's
                options.pop("dest")
                group.add_argument(self.dest(name), help=text, metavar=name, **options)
                continue
            group.add_argument(*flags, required=required and self.trigger is None,
                               help=text, metavar=_metavar(name, options), **options)

    def given(self, namespace: argparse.Namespace) -> dict:
        """field -> value for this section's flags that the user gave."""
        values = vars(namespace)
        return {name: tuple(value) if isinstance(value, list) else value
                for name in self.fields if self.dest(name) in values
                for value in (values[self.dest(name)],)}

    def build(self, namespace: argparse.Namespace, **extra):
        """The dataclass from the given flags (plus ``extra`` fields) and its own defaults; None
        for an optional section whose trigger was not given. Raises ValueError naming flags."""
        given = self.given(namespace)
        if self.trigger is not None and self.trigger not in given:
            if given:
                raise ValueError(f"{', '.join(self.flag(n) for n in given)}: only with "
                                 f"{self.flag(self.trigger)}")
            return None
        return self.cls(**given, **extra)



def check_coverage(sections: typing.Iterable[Section], skip: dict[type, tuple[str, ...]]) -> None:
    """Every field of every dataclass has exactly one flag (or is in ``skip``, e.g. nested
    configs): no option is unreachable from the command line or set in two places."""
    seen: dict[type, list[str]] = {}
    for section in sections:
        seen.setdefault(section.cls, []).extend(section.fields)
    for cls, names in seen.items():
        expected = sorted(f.name for f in dataclasses.fields(cls) if f.name not in skip.get(cls, ()))
        if sorted(names) != expected:
            raise TypeError(f"{cls.__name__}: flags {sorted(names)} do not match fields {expected}")


def _is_value_tuple(kind) -> bool:
    """``tuple[int, ...]`` (or of float, str): a flag taking one or more values."""
    args = typing.get_args(kind)
    return typing.get_origin(kind) is tuple and len(args) == 2 and args[1] is Ellipsis \
        and args[0] in (int, float, str)


def _metavar(name: str, options: dict) -> str | None:
    if "choices" in options:
        return None  # argparse shows {a,b,...}
    return re.sub(r"_(path|dir)$", "", name).upper()


def user_error(prog: str, message: str, exit_code: int = 2) -> NoReturn:
    """End a command for a user's mistake: one ``<prog>: error: ...`` line on stderr from rank 0
    (every rank of a torchrun world sees the same mistake), ``exit_code`` on every rank."""
    if os.environ.get("RANK", "0") == "0":
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(exit_code)


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line from rank 0 (the usage is in ``--help``), and which
    takes flags only as spelled in full (Megatron-LM's ``allow_abbrev=False``): ``--train-iter``
    is refused, not read as ``--train-iters`` behind the launch scripts' back."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        user_error(self.prog, f"{message} (see --help)")


@dataclass(frozen=True)
class Command:
    """A console script's command line: its sections, one per config dataclass.

    Args:
        prog: the name in ``--help`` and in error lines.
        description: ``--help``'s first paragraph.
        sections: the help groups; each section's ``key`` names the dataclass it builds.
    """

    prog: str
    description: str
    sections: tuple[Section, ...]

    def __post_init__(self) -> None:
        check_coverage(self.sections, skip={})

    def parser(self) -> argparse.ArgumentParser:
        parser = Parser(prog=self.prog, description=self.description)
        for section in self.sections:
            section.add_to(parser)
        return parser

    def parse(self, argv: Sequence[str] | None = None) -> dict[str, object]:
        """key -> its dataclass built from the flags; a bad flag (argparse's or a dataclass's
        ValueError/FileNotFoundError) ends the command as :func:`user_error`."""
        parser = self.parser()
        namespace = parser.parse_args(argv)
        try:
            return {section.key: section.build(namespace) for section in self.sections}
        except USER_ERRORS as error:
            parser.error(str(error))


LAUNCHER_ERRORS = "MEGATRON_SIMPO_LAUNCHER_ERRORS"
"""Environment variable: the folder where ranks started by the launcher leave their one line."""


def _marker(kind: str) -> str | None:
    """Under the launcher, this rank's ``local<LOCAL_RANK>.<kind>`` in its folder."""
    folder = os.environ.get(LAUNCHER_ERRORS)
    return os.path.join(folder, f"local{os.environ.get('LOCAL_RANK', '0')}.{kind}") if folder \
        else None


def _leave_marker(kind: str) -> None:
    marker = _marker(kind)
    if marker:
        with contextlib.suppress(OSError):  # the launcher is gone: nobody to tell
            open(marker, "w").close()


def note_started() -> None:
    """Under the launcher, remove what a rank that held this place before an elastic restart
    left: its ``local<LOCAL_RANK>.done`` and ``.began`` and its ``rank<RANK>.txt`` line."""
    folder = os.environ.get(LAUNCHER_ERRORS)
    if folder:
        for name in (_marker("done"), _marker("began"), os.path.join(folder, _line_file())):
            with contextlib.suppress(OSError):
                os.remove(name)


def _line_file() -> str:
    return f"rank{os.environ.get('RANK', '0')}.txt"


def note_training_began() -> None:
    """Under the launcher, leave ``local<LOCAL_RANK>.began``: this rank's training began (a
    signal before any rank's did stops a run with nothing to save)."""
    _leave_marker("began")


def note_finished() -> None:
    """Under the launcher, leave ``local<LOCAL_RANK>.done`` in its folder: this rank ended well
    (so a launcher that was signalled knows its ranks saved and stopped rather than died)."""
    _leave_marker("done")


def run_command(prog: str, call: Callable[[], T], *,
                errors: Mapping[type | tuple[type, ...], int] | None = None,
                distributed: bool = False) -> T:
    """How every entry point ends: ``call()``'s result, or, for an exception ``errors`` lists
    (default: :data:`USER_ERRORS`, exit code 2), :func:`user_error` with its message and code.

    Under the launcher (``megatron_simpo.cli.launch``, which sets :data:`LAUNCHER_ERRORS`), a
    rank writes its exit code and line to ``rank<RANK>.txt`` in that folder instead of printing
    the line, and exits with the code: the launcher prints one line (rank 0's, else the first
    failed rank's), so a mistake only one rank sees is reported too.

    A stop signal ends the command after its clean-up (SIGTERM raises :class:`Stopped` as
    SIGINT raises KeyboardInterrupt; ``finally`` blocks and context managers run) with one
    line, ``<prog>: stopped by SIGTERM``, unless the command handles signals itself
    (training's ``lifecycle.StopRequests``): SIGTERM with exit code 143; Ctrl-C as Python ends
    on it, by SIGINT itself once the interpreter has finished (no traceback), so that a shell
    script running the command stops too. Under torchrun the process also ends when its agent
    dies (``lifecycle.die_with_parent``).

    Args:
        distributed: the command starts process groups: they are shut down however it ends.
    """
    import signal
    import threading

    from megatron_simpo.distributed.lifecycle import die_with_parent

    if os.environ.get("TORCHELASTIC_RUN_ID"):  # under torchrun: never outlive its agent
        die_with_parent()
    previous = None
    if (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL):
        previous = signal.signal(signal.SIGTERM, _raise_stopped)
    try:
        return call()
    except (KeyboardInterrupt, Stopped) as stop:
        number = getattr(stop, "number", signal.SIGINT)
        if os.environ.get("RANK", "0") == "0" and not getattr(stop, "said", False):
            print(f"{prog}: stopped by {signal.Signals(number).name}", file=sys.stderr,
                  flush=True)
        stop.said = True  # (a command run inside another says it once)
        if isinstance(stop, KeyboardInterrupt):
            sys.excepthook = _quiet_on_interrupt(sys.excepthook)
            raise
        raise SystemExit(128 + number) from None
    except Exception as error:
        for kinds, exit_code in ({USER_ERRORS: 2} if errors is None else errors).items():
            if isinstance(error, kinds):
                # KeyError's str() is its repr: the message is its argument.
                message = str(error.args[0] if isinstance(error, KeyError) else error)
                folder = os.environ.get(LAUNCHER_ERRORS)
                if folder:
                    write_text_atomically(  # whole, for the launcher to read
                        os.path.join(folder, _line_file()),
                        f"{exit_code}\n{prog}: error: {message}\n")
                    raise SystemExit(exit_code)
                user_error(prog, message, exit_code)
        from megatron_simpo.distributed.lifecycle import lost_a_peer_that_said_why

        if lost_a_peer_that_said_why(error, os.environ.get(LAUNCHER_ERRORS), _line_file(),
                                     Stopped):  # its line is the run's: no collateral traceback
            raise SystemExit(1) from None
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if distributed:
            from megatron_simpo.distributed import runtime

            runtime.shutdown()


class Stopped(BaseException):
    """SIGTERM, raised in a command's main thread (as SIGINT raises KeyboardInterrupt)."""

    def __init__(self, number: int):
        super().__init__(number)
        self.number = number


def _raise_stopped(number: int, frame) -> None:
    raise Stopped(number)


def _quiet_on_interrupt(hook):
    """``hook``, but silent for KeyboardInterrupt: the command said why it stopped, and Python
    still ends the process by SIGINT for the uncaught interrupt."""
    if getattr(hook, "quiet_on_interrupt", False):
        return hook

    def quiet(kind, value, traceback):
        if not issubclass(kind, KeyboardInterrupt):
            hook(kind, value, traceback)

    quiet.quiet_on_interrupt = True
    return quiet
