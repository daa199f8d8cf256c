"""The command-line conventions every script follows: one-line usage errors, exit status 2, a short --help.

    import cli

    def main(argv):
        ...
        raise ValueError(f"--tokenizer={path} not found: expected a SentencePiece .model")

    if __name__ == "__main__":
        define_flags()
        cli.run(main)

`cli.run(main, summary=None)` runs `main` as `absl.app.run` does, with these conventions:

* A usage error is one line on stderr, `SCRIPT.py: error: MESSAGE`, and exit status 2, as
  argparse does; no usage text, no traceback. Usage errors are the flags absl cannot parse
  (unknown, malformed, a required flag missing, a validator failing) and the ValueError,
  FileNotFoundError and `cli.UsageError` (absl's `app.UsageError`) that escape `main`, whose
  message names the flag or path and says what was expected.
* `--help` (also -h, -? and --helpshort) prints a summary, then the flags of this repository's
  modules that the script defines (sft.py's include train.py's), and exits 0. The summary is
  `summary` if given, else the module docstring's first paragraph and the indented example
  commands right after it; the rest of the docstring is the long documentation, which
  `python -m pydoc SCRIPT`, README.md and docs/ show. `--helpfull` stays absl's: the whole
  docstring and every flag, the libraries' included.
* `cli.error(message)` reports a usage error from anywhere (prints the line, exits 2).
* `cli.plural(count, noun)` words a count in a message ("1 process", "2 processes").
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from absl import app, flags

UsageError = app.UsageError
USAGE_ERRORS = (UsageError, ValueError, FileNotFoundError)
HELP = ("-h", "-?", "--help", "-help", "--helpshort", "-helpshort")
REQUIRED = re.compile(r"flag --(\w+)=None: Flag --\1 must have a value other than None\.")
REPO = os.path.dirname(os.path.abspath(__file__))
_stderr = None  # run(): the script's stderr as it started, for error()


def error(message: str) -> NoReturn:
    """Print `SCRIPT.py: error: MESSAGE` on one line and exit with status 2.

    The line goes to the stderr the script started with (run() keeps a copy: a library may have
    muted stderr on its way down, as checkpoint.damaged does) and is the last thing there: what
    libraries print while the process winds down goes to /dev/null."""
    one_line = "; ".join(line.strip() for line in str(message).splitlines() if line.strip())
    report = _stderr or sys.stderr
    report.write(f"{os.path.basename(sys.argv[0])}: error: {one_line}\n")
    report.flush()
    sys.stderr = open(os.devnull, "w")
    os.dup2(sys.stderr.fileno(), 2)
    sys.exit(2)


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """A count with its noun agreed, for messages: '1 process', '2 processes', '1,024 tokens'."""
    return f"{count:,} {noun if count == 1 else nouns or noun + 's'}"


def summary_of(doc: str | None) -> str:
    """The docstring's first paragraph and the indented paragraphs (example commands) after it."""
    paragraphs = (doc or "").strip("\n").split("\n\n")
    kept = paragraphs[:1]
    for paragraph in paragraphs[1:]:
        if not paragraph.startswith((" ", "\t")):
            break
        kept.append(paragraph)
    return "\n\n".join(kept).rstrip()


def _own_flag_modules() -> list[str]:
    """Modules of this repository that define flags, the script's own first (absl names it by argv[0])."""
    names = [name for name in flags.FLAGS.flags_by_module_dict()
             if os.path.dirname(os.path.abspath(getattr(sys.modules.get(name), "__file__", None) or name)) == REPO]
    return sorted(names, key=lambda name: name != sys.argv[0])


def short_help(summary: str) -> str:
    script = os.path.basename(sys.argv[0])
    sections = [f"{os.path.basename(name).removesuffix('.py')}.py flags:\n"
                + flags.FLAGS.module_help(name).strip("\n").split("\n", 1)[1] for name in _own_flag_modules()]
    return (f"{summary}\n\n" + "\n\n".join(sections) + "\n\n"
            f"Full documentation: python -m pydoc {script.removesuffix('.py')}, README.md and docs/. "
            "Every flag, the libraries' too: --helpfull.\n")


# Device files of the accelerators JAX drives: TPU v4/v5p, TPU v5e/v6e, NVIDIA, AMD.
ACCELERATOR_DEVICES = ("/dev/accel0", "/dev/vfio/0", "/dev/nvidiactl", "/dev/kfd")


def cpu_only_without_accelerator() -> None:
    """On a host with no accelerator, use JAX's CPU backend only, unless JAX_PLATFORMS says
    otherwise. With libtpu (requirements-dev.txt) or the CUDA plugin (requirements-compile-gpu.txt)
    installed for the dry run, which compiles for TPUs and GPUs, JAX would otherwise try them at
    startup and print a TPU hostname error or a CUDA traceback before every run."""
    if "JAX_PLATFORMS" not in os.environ and not any(os.path.exists(d) for d in ACCELERATOR_DEVICES):
        os.environ["JAX_PLATFORMS"] = "cpu"  # for a later `import jax`, and the processes it starts
        if "jax" in sys.modules:  # imported already: its config read the environment then
            sys.modules["jax"].config.update("jax_platforms", "cpu")


def run(main: Callable[[Sequence[str]], object], summary: str | None = None) -> None:
    """absl.app.run(main) with this module's conventions (see the module docstring)."""
    global _stderr
    summary = summary_of(sys.modules["__main__"].__doc__) if summary is None else summary
    cpu_only_without_accelerator()
    _stderr = os.fdopen(os.dup(2), "w")

    def parse(argv: list[str]) -> list[str]:
        arguments = argv[1:argv.index("--")] if "--" in argv else argv[1:]
        if any(a in HELP for a in arguments):
            sys.stdout.write(short_help(summary))
            sys.exit(0)
        try:
            return flags.FLAGS(argv)
        except flags.UnrecognizedFlagError as e:
            error(f"{e} ({os.path.basename(argv[0])} --help lists the flags)")
        except flags.Error as e:  # absl's wording, shortened where it is a known form
            error(REQUIRED.sub(r"--\1 is required (see --help)", str(e)).removeprefix("ERROR:: "))

    def guarded(argv: Sequence[str]) -> object:
        try:
            return main(argv)
        except USAGE_ERRORS as e:
            error(str(e))

    app.run(guarded, flags_parser=parse)
