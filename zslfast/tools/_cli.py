"""What every ``python -m zslfast`` command shares: its parser, one-line errors, and the conditions of its timings.

- ``Parser``: argparse with every option's default in its help, the description as written (plain text), and
  usage errors as one line (``python -m zslfast demo: error: ... (python -m zslfast demo --help)``), exit code 2.
- the options' types (``integer``, ``real``, ``fraction``, ``seed``, ``matching``, ``output_file``, ``output_folder``,
  ``existing_file``): every number, path and filter of every command is read by one of them (or is a choice),
  so a bad value is a one-line usage error, exit code 2, before any work (never NaN trained into a model, an
  overflow deep in numpy or torch, or an output path that fails after the whole run); a test checks every option.
- ``UsageError``: a problem the user fixes (a missing folder, no GPU for ``--device cuda``, a batch larger than
  the data): ``run_command`` prints it as one line and exits with 2, instead of a traceback from deep in torch.
- ``timing_conditions``: the line every timing print starts with (torch's threads, the cores, the load average),
  and a warning when other processes are busy: one competing process turned the demo's 1.35x into 6.59x.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from .. import _backend


class UsageError(Exception):
    """A problem with the command line or this machine that the user can fix; printed as one line, exit code 2."""


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written (its line breaks kept) and each option's default after its help (none for
    options whose default is None or False: their help says what leaving them out does)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    def __init__(self, prog: Optional[str] = None, description: Optional[str] = None, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(prog=prog, description=description, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ------------------------------------------------------------------------------------ the options' one rule


def integer(minimum: int, maximum: Optional[int] = None) -> Callable[[str], int]:
    """An argparse type: an integer in [minimum, maximum] (no maximum: unbounded)."""

    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            allowed = f"at least {minimum}" if maximum is None else f"in {minimum}..{maximum}"
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {value}")
        return value

    convert.__name__ = f"integer({minimum}, {maximum})"
    return convert


def real(minimum: float, *, above: bool = False, below: Optional[float] = None) -> Callable[[str], float]:
    """An argparse type: a finite float >= minimum (> minimum when ``above``), < ``below`` when given; NaN and inf
    are refused."""

    def convert(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if (not math.isfinite(value) or value < minimum or (above and value == minimum)
                or (below is not None and value >= below)):
            upper = "" if below is None else f" and < {below:g}"
            raise argparse.ArgumentTypeError(f"must be a finite number {'>' if above else '>='} {minimum:g}{upper}, "
                                             f"got {text!r}")
        return value

    convert.__name__ = f"real({minimum:g}, above={above}, below={below})"
    return convert


positive_int = integer(1)
non_negative_int = integer(0)
# What every seed consumer accepts: numpy's legacy seeding stops at 2**32 - 1, torch's generators at 2**64 - 1.
seed = integer(0, 2**32 - 1)
non_negative_float = real(0.0)
positive_float = real(0.0, above=True)
fraction = real(0.0, above=True, below=1.0)  # in (0, 1)


def matching(names: Sequence[str], what: str) -> Callable[[str], str]:
    """An argparse type: text found in at least one of ``names`` (a filter that selects nothing is a typo)."""

    def convert(text: str) -> str:
        if not any(text in name for name in names):
            raise argparse.ArgumentTypeError(f"{text!r} matches no {what}; the {what}s: {', '.join(names)}")
        return text

    convert.__name__ = f"matching({what})"
    return convert


def _writable(text: str, folder: bool) -> str:
    """``text`` if a file (or folder) can be written there: an existing one of the right kind, or a new one under
    the nearest existing folder, where a probe file is created and removed (os.access says yes to root even in
    /proc). The command creates the missing folders when it writes."""
    path = Path(text).expanduser()
    kind = "folder" if folder else "file"
    if path.exists() and path.is_dir() != folder:
        raise argparse.ArgumentTypeError(f"{text} is {'a file' if folder else 'a folder'}, not a {kind}")
    if not folder and path.exists() and not os.access(path, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text}: the file is not writable")
    start = path if folder else path.parent
    existing = next(p for p in (start.absolute(), *start.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise argparse.ArgumentTypeError(f"{text}: {existing} is not writable ({err.strerror or err})") from None
    return text


def output_file(text: str) -> str:
    """An argparse type: the path of a file that can be written (checked before the command runs)."""
    return _writable(text, folder=False)


def output_folder(text: str) -> str:
    """An argparse type: a folder that exists and can be written in, or can be created."""
    return _writable(text, folder=True)


def existing_file(text: str) -> str:
    """An argparse type: a file that exists."""
    if not Path(text).expanduser().is_file():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    return text


def run_command(prog: str, run: Callable, args: argparse.Namespace):
    """``run(args)``, with a UsageError printed as one line and exit code 2 (KeyboardInterrupt: 130, no traceback)."""
    try:
        return run(args)
    except UsageError as err:
        sys.stderr.write(f"{prog}: error: {err}\n")
        sys.exit(2)
    except KeyboardInterrupt:
        sys.stderr.write(f"\n{prog}: interrupted\n")
        sys.exit(130)


def main(prog: str, description: str, add_arguments: Callable, run: Callable, argv: Optional[Sequence[str]] = None):
    """One command on its own (``python -m zslfast.tools.audit``, ``zslfast.tools.demo.main([...])``)."""
    parser = Parser(prog, description)
    add_arguments(parser)
    return run_command(prog, run, parser.parse_args(argv))


def device(text: str) -> torch.device:
    """``--device``: a torch device that exists here, else a UsageError saying what can run."""
    try:
        chosen = torch.device(text)
    except RuntimeError as err:
        raise UsageError(f"--device {text!r} is not a device ({err}); use cpu or cuda") from None
    if chosen.type == "cuda":
        why = _backend.why_no_cuda_device()
        if why:
            raise UsageError(f"--device {text}: no CUDA device here ({why}); drop --device to run on the CPU")
        if chosen.index is not None and chosen.index >= torch.cuda.device_count():
            raise UsageError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif chosen.type != "cpu":
        raise UsageError(f"--device {text}: zslfast runs on cpu or cuda devices")
    return chosen


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _load_average() -> Optional[float]:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # Windows
        return None


def timing_conditions(device: torch.device, busy_self: float = 0.0) -> str:
    """``timed on cpu: 2 torch threads, 2 cores, load average 0.1`` and, on a line of its own, a warning when other
    processes keep more cores busy than torch's threads leave free (on CPU) or any core busy (a GPU run's host).

    ``busy_self``: how many cores this process itself kept busy in the last minute (its threads, when asked after
    timing), subtracted from the load average.
    """
    threads, cores, load = torch.get_num_threads(), _cores(), _load_average()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    line = f"timed on {where}: {threads} torch threads, {cores} cores"
    if load is None:
        return line
    line += f", load average {load:.1f} (1 min)"
    others = load - busy_self
    free = cores - (threads if device.type == "cpu" else 1)
    if others > free + 0.5:
        line += (f"\nWARNING: other processes keep ~{others:.1f} of {cores} cores busy: these timings are not "
                 f"reliable (one competing process can turn a 1.3x speed-up into 6x); rerun on an idle machine")
    return line
