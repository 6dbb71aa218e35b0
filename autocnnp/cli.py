"""``autocnnp`` command line. Validation and planning never import torch (they must stay fast)."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
import typing
from pathlib import Path

from . import api
from .core.errors import DataError, ExitCode, Interrupted, JobError
from .core.files import WriteRefused
from .engine.values import type_name
from .generator.points import POINTS, TRACKERS
from .run.processes import end_on_stop_signals, interruptible

# Feature areas that add their own subcommands (each module: ``add_commands(subparsers)``; keep its
# imports light, torch only inside the command functions). A command of this module's own (validate, plan,
# run, new, components) builds only its own parsers: importing the feature areas would cost validate more
# than its whole budget.
COMMAND_MODULES = ("autocnnp.data.commands", "autocnnp.export", "autocnnp.inference", "autocnnp.run.commands",
                   "autocnnp.tracking.dashboard", "autocnnp.tracking.zoo", "autocnnp.tuning.commands",
                   "autocnnp.tuning.scale", "autocnnp.federation.commands")


def cmd_validate(args) -> int:
    valid = api.validate(args.job, args.set)
    print(f"{valid.job.spec.file}: valid ({valid.task}, {valid.world_size} ranks, {valid.strategy}, {valid.architecture})")
    if not args.data:
        return ExitCode.OK
    found = api.check_data(valid.job)  # every file of the job's datasets: NIfTI readable, shapes, affines, labels
    for problem in found.problems:
        print(f"autocnnp: {problem}", file=sys.stderr)
    for note in found.notes:
        print(f"autocnnp: note: {note}", file=sys.stderr)
    checked = ", ".join(map(str, found.files)) or "nothing (the dataset has no files)"
    print(f"data: {len(found.problems)} problem(s) in {checked}" + (f", {len(found.notes)} note(s)" if found.notes else ""))
    return ExitCode.OK if found.ok else ExitCode.BAD_INPUT


def cmd_plan(args) -> int:
    print(api.plan(args.job, args.set))
    return ExitCode.OK


def cmd_run(args) -> int:
    return api.train(args.job, args.set, repeat=args.repeat, launcher=args.launcher).exit_code


def cmd_new(args) -> int:
    target = Path(args.path)
    if target.exists() and not args.force:
        raise JobError(target, "the file exists already", "choose another name or pass --force")
    from importlib import resources  # here: with its zipfile, tempfile and shutil it costs validate ~10 ms

    target.write_text(resources.files("autocnnp.templates").joinpath("job.xml").read_text())
    print(f"wrote {target}; check it with: autocnnp validate {target}")
    return ExitCode.OK


def cmd_components(args) -> int:
    """List every built-in implementation of each extension point with its parameters."""
    for point in POINTS:
        if args.point and args.point not in (point.type, *point.aliases):
            continue
        kind = "extensible" if point.extensible else "non-extensible"
        print(f"{point.type} ({point.title}, {kind}; default {point.default or 'set by ' + point.folder})")
        _list(point.registry)
    if args.point in (None, "tracker"):
        print("tracker (<monitoring> tracker, several at once; default files)")
        _list(TRACKERS)
    return ExitCode.OK


def _list(registry) -> None:
    for name in registry.names():
        for entry in registry.builtins(name):
            if entry.name == name:  # not an alias of another implementation
                _describe(name, entry)


def _describe(name: str, entry) -> None:
    """One implementation and its parameters (``autocnnp components``)."""
    print(f"  {name} [{', '.join(entry.frameworks)}]: {entry.summary}")
    if entry.config is not None:
        hints = typing.get_type_hints(entry.config)
        for f in dataclasses.fields(entry.config):
            default = "required" if f.default is dataclasses.MISSING else f"default {f.default!r}"
            extra = f"; also {', '.join(f.metadata['aliases'])}" if f.metadata.get("aliases") else ""
            print(f"      {f.name} ({type_name(hints[f.name])}, {default}{extra}): {f.metadata.get('help', '')}")


OWN_COMMANDS = ("validate", "plan", "run", "new", "components")


def parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command line's parser; for ``command`` one of OWN_COMMANDS, without the feature areas' commands."""
    p = argparse.ArgumentParser(prog="autocnnp", description="XML job files to distributed CNN segmentation training")
    sub = p.add_subparsers(dest="command", required=True)
    for name, fn, doc in (("validate", cmd_validate, "check a job file (schema and semantics); builds nothing"),
                          ("plan", cmd_plan, "print the assembled generator, hyperparameters and launch command"),
                          ("run", cmd_run, "train: launch the ranks and run the job")):
        s = sub.add_parser(name, help=doc, description=doc)
        s.add_argument("job", help="the XML job file")
        s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override the job, e.g. hyperparameters.lr=1e-4, lr_policy=grescale, seed=3 (repeatable)")
        s.set_defaults(func=fn)
        if name == "validate":
            s.add_argument("--data", action="store_true", help="also check every file of the job's datasets")
        if name == "run":
            s.add_argument("--repeat", type=int, default=1, metavar="K",
                           help="train K times with seeds seed..seed+K-1 into output/seed-<s>/ and summarise "
                                "the final metrics (mean, standard deviation)")
            s.add_argument("--launcher", help="how to start the ranks: auto, mpirun, srun, inplace "
                           "(overrides the job's <cluster> launcher)")
    s = sub.add_parser("new", help="write a commented starter job file")
    s.add_argument("path", nargs="?", default="job.xml")
    s.add_argument("--force", action="store_true", help="overwrite an existing file")
    s.set_defaults(func=cmd_new)
    s = sub.add_parser("components", help="list the built-in implementations of every action and their parameters")
    s.add_argument("point", nargs="?", help="only this action type (e.g. dist_strategy)")
    s.set_defaults(func=cmd_components)
    for module in () if command in OWN_COMMANDS else COMMAND_MODULES:
        importlib.import_module(module).add_commands(sub)
    return p


class PipeGuard:
    """Standard output that turns into /dev/null once its reader has gone (``autocnnp predict | head -1``):
    the command finishes its work instead of dying with a BrokenPipeError traceback."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._divert()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._divert()

    def _divert(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())
        os.close(devnull)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def main(argv: list[str] | None = None) -> int:
    """Run one command; its errors, a write the filesystem refuses and the signals that stop it (Ctrl-C,
    SIGTERM, SIGHUP) end it with one line and its ``ExitCode``, never a traceback. Called without ``argv`` it is
    the process (``autocnnp``, ``python -m autocnnp``): those signals do so from its start to its end."""
    if argv is None:
        code = [ExitCode.FAILED]  # an exception that escapes: Python's traceback, then exit 1
        exiting = end_on_stop_signals(lambda: code[0])  # what interruptible() gives back once the command returns
        try:
            code[0] = main(sys.argv[1:]) or 0
        except SystemExit as exc:  # argparse: --help, a usage error
            code[0] = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
            raise
        finally:
            exiting()
        return code[0]
    args = parser(argv[0] if argv else None).parse_args(argv)
    stdout, sys.stdout = sys.stdout, PipeGuard(sys.stdout)
    try:
        with interruptible():
            return args.func(args)
    except (JobError, DataError, Interrupted) as exc:
        print(f"autocnnp: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except WriteRefused as exc:  # a full, over-quota or read-only filesystem: what and where, on one line
        print(f"autocnnp: {exc}", file=sys.stderr, flush=True)
        return ExitCode.FAILED
    finally:
        sys.stdout.flush()
        sys.stdout = stdout
