"""``autocnnp`` command line. Validation and planning never import torch (they must stay fast)."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from .engine.errors import JobError

# Feature areas that add their own subcommands (each module: ``add_commands(subparsers)``; keep its
# imports light, torch only inside the command functions).
COMMAND_MODULES = ("autocnnp.data.commands", "autocnnp.run.commands", "autocnnp.tuning.commands")


def _assemble(path: str, sets: list[str] | None = None):
    from .generator.assemble import assemble

    if sets:  # --set KEY=VALUE: a job variant (engine/overrides.py)
        from .engine.overrides import parse_sets, read_variant

        return assemble(read_variant(path, parse_sets(sets)))
    return assemble(path)


def cmd_validate(args) -> int:
    gen = _assemble(args.job, args.set)
    print(f"{gen.job.file}: valid ({gen.job.task}, {gen.degree} ranks, "
          f"{gen.action('dist_strategy').entry.name}, {gen.action('architecture_injection').entry.name})")
    return _validate_data(gen) if args.data else 0


def _validate_data(gen) -> int:
    """Check every file of the job's datasets (NIfTI readable, shapes, affines, labels)."""
    from .data.decathlon import validate_dataset

    config = gen.action("dataset_injection").config
    roots = [getattr(config, part) for part in ("train", "valid", "test") if getattr(config, part, None)]
    problems = [p for root in roots for p in validate_dataset(root)]
    for problem in problems:
        print(f"autocnnp: {problem}", file=sys.stderr)
    checked = ", ".join(map(str, roots)) or "nothing (the dataset has no files)"
    print(f"data: {len(problems)} problem(s) in {checked}")
    return 2 if problems else 0


def cmd_plan(args) -> int:
    from .generator.plan import render
    from .run.launch import build_command

    gen = _assemble(args.job, args.set)
    print(render(gen, build_command(gen)[0]))
    return 0


def cmd_run(args) -> int:
    from .run.launch import run

    gen = _assemble(args.job, args.set)
    if getattr(args, "launcher", None):  # the command line overrides <cluster> launcher
        from .run.overrides import with_cluster

        gen = with_cluster(gen, {"launcher": args.launcher})
    if args.repeat != 1:  # K runs with seeds seed, seed+1, ... in output/seed-<s>/, then mean and std
        from .run.repeat import run_repeats

        return run_repeats(gen, args.repeat)
    return run(gen)


def cmd_new(args) -> int:
    from importlib import resources

    target = Path(args.path)
    if target.exists() and not args.force:
        raise JobError(target, "the file exists already", "choose another name or pass --force")
    text = resources.files("autocnnp.templates").joinpath("job.xml").read_text()
    target.write_text(text)
    print(f"wrote {target}; check it with: autocnnp validate {target}")
    return 0


def parser() -> argparse.ArgumentParser:
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
    for module in COMMAND_MODULES:
        importlib.import_module(module).add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except JobError as exc:
        print(f"autocnnp: {exc}", file=sys.stderr)
        return exc.exit_code
