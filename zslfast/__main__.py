"""``python -m zslfast COMMAND``: info (the default), train, demo, bench, audit, gpucheck.

Each command lives in its own module with ``add_arguments(parser)``, ``run(args)`` and a ``DESCRIPTION`` shown
by ``--help``; only the chosen command's module is imported (each pulls in torch and, for some, triton).
"""

import difflib
import importlib
import sys

import torch

from .tools import _cli

PROG = "python -m zslfast"

# name -> (module, one-line summary for the list of commands)
COMMANDS = {
    "info": ("zslfast.__main__", "what was built and which backends run here (the default)"),
    "train": ("zslfast.tools.train", "train ILPG, SVIP or SAGE from a benchmark's images with the paper's recipe; "
                                     "CZSL and GZSL U/S/H every epoch; resumable, torchrun"),
    "demo": ("zslfast.tools.demo", "train ILPG (or SAGE) with the reference ops and with the fused ops: time, "
                                   "memory, loss difference, GZSL U/S/H"),
    "bench": ("zslfast.tools.bench", "each op's forward+backward time and peak memory against the eager code, here"),
    "audit": ("zslfast.tools.audit", "compile every Triton kernel for sm_80/sm_90 without a GPU: registers, "
                                     "spills, occupancy"),
    "gpucheck": ("zslfast.tools.gpucheck", "the GPU self-test: every op against the fp64 reference, then timings"),
}

DESCRIPTION = "Say what zslfast was built with and which backends can run on this machine's tensors."


def add_arguments(parser) -> None:
    """``info`` takes no options."""


def run(args=None) -> None:
    from . import _backend, available_backends

    built = _backend.BUILD_INFO
    if _backend.extension_warning():
        print(_backend.extension_warning(), file=sys.stderr)
    print(f"zslfast on torch {torch.__version__}; CUDA devices: {torch.cuda.device_count()}")
    if built:
        print(f"extension: built for torch {built.TORCH_VERSION}, {'with' if built.WITH_CUDA else 'without'} CUDA kernels")
    else:
        print(f"extension: not loaded ({_backend.EXTENSION_ERROR})")
    print(f"backends for cpu tensors: {', '.join(available_backends('cpu'))}")
    cuda = available_backends("cuda")
    print(f"backends for cuda tensors: {', '.join(cuda)}" if cuda else
          f"cuda tensors: none here ({_backend.why_no_cuda_device()})")
    print(f"\nrun `{PROG} train`, `{PROG} demo` or `{PROG} bench` (add --help for their options; "
          f"`{PROG} --help` lists the commands)")


def _parser(command=None) -> _cli.Parser:
    """The top-level parser; only ``command``'s module is imported to add its options."""
    parser = _cli.Parser(PROG, f"zslfast's command-line tools. `{PROG} COMMAND --help` describes one command and "
                               f"its options;\nwith no command, info.")
    commands = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND", parser_class=_cli.Parser)
    for name, (module_name, summary) in COMMANDS.items():
        if name == command:
            module = importlib.import_module(module_name)
            sub = commands.add_parser(name, help=summary, description=module.DESCRIPTION, prog=f"{PROG} {name}")
            module.add_arguments(sub)
            sub.set_defaults(run=module.run)
        else:
            commands.add_parser(name, help=summary, add_help=False)
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command is not None and command not in COMMANDS:
        close = difflib.get_close_matches(command, COMMANDS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        sys.stderr.write(f"{PROG}: error: unknown command {command!r}{hint} The commands: {', '.join(COMMANDS)} "
                         f"(see {PROG} --help)\n")
        sys.exit(2)
    args = _parser(command).parse_args(argv)
    if args.command is None:  # no command: info
        return run()
    return _cli.run_command(f"{PROG} {args.command}", args.run, args)


if __name__ == "__main__":
    status = main()  # a command returns its results (the demo's dict) or an exit status
    sys.exit(status if isinstance(status, int) else 0)
