"""Data commands of the ``autocnnp`` CLI: synth, preprocess, check-data.

``add_commands(sub)`` adds them to the CLI's sub-parsers. Heavy modules (numpy, nibabel, torch)
are imported inside the command functions, so ``autocnnp validate`` stays fast and torch-free.
Bad data is one DataError paragraph on stderr (the CLI prints it) with exit code 2.

* ``autocnnp synth OUT --kind brain|atrium|tubes --cases N --shape X Y Z --seed S --test-cases T``
* ``autocnnp preprocess DATA CACHE --slices N --size S --mode even|labelled|mixed --foreground-fraction F
  --modalities all --workers N`` (progress on stderr; an interrupted run started again goes on where it stopped)
* ``autocnnp check-data DATA|CACHE [--num-classes K]``
"""

from __future__ import annotations

import ast
import sys
import time
from pathlib import Path

from ..core.cli_args import count, positive
from ..core.errors import DataError, Location, Source
from ..engine.job import Setting
from ..engine.values import bind
from ..generator.points import POINT_BY_NAME

# --------------------------------------------------------------------------------------------
# synth

def _synth_defaults() -> dict:
    """write_synthetic_dataset's keyword defaults, read from its source (importing it costs numpy, and the
    CLI builds every parser)."""
    tree = ast.parse(Path(__file__).with_name("synth.py").read_bytes())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "write_synthetic_dataset")
    named = fn.args.args[len(fn.args.args) - len(fn.args.defaults):]
    return {a.arg: ast.literal_eval(d) for a, d in zip(named, fn.args.defaults, strict=True)}


def cmd_synth(args) -> int:
    from .synth import write_synthetic_dataset

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise DataError(out, "exists and is not a folder", "name a new or an existing folder")
    try:
        write_synthetic_dataset(out, args.kind, cases=args.cases, shape=tuple(args.shape), seed=args.seed,
                                test_cases=args.test_cases)
    except ValueError as exc:
        raise DataError(out, str(exc), "see `autocnnp synth --help`") from None
    print(f"wrote {args.cases} training and {args.test_cases} test {args.kind} case(s) of shape "
          f"{' x '.join(str(s) for s in args.shape)} (seed {args.seed}) to {out} "
          f"(dataset.json, imagesTr/, labelsTr/, imagesTs/, labelsTs/)")
    return 0


# --------------------------------------------------------------------------------------------
# preprocess

# option -> the decathlon Config field it sets: the Config holds the defaults and bounds, as in a job
PREPROCESS_OPTIONS = {"slices": "slices_per_volume", "size": "size", "mode": "slice_mode",
                      "foreground_fraction": "foreground_fraction", "modalities": "modalities"}


def _preprocessing(args):
    """The decathlon Config a job with these options would bind (a bad value is refused as a job's would be)."""
    point = POINT_BY_NAME["dataset_injection"]  # the default data format: decathlon, whose slice cache this builds
    entry = point.registry.get(point.default, Location(Path(args.data)))
    settings = [Setting(field, str(value), Source(Path("."), text=f"autocnnp preprocess --{option.replace('_', '-')}"))
                for option, field in PREPROCESS_OPTIONS.items() if (value := getattr(args, option)) is not None]
    if args.no_normalise:
        settings.append(Setting("normalise", "false", Source(Path("."), text="autocnnp preprocess --no-normalise")))
    settings.append(Setting("train", str(args.data), Source(Path("."), text="autocnnp preprocess DATA")))
    return bind(entry.config, settings, Path.cwd(), "preprocess")


def cmd_preprocess(args) -> int:
    from .checks import check_dataset, problems_error
    from .preprocess import META_FILE, build_cache, read_cache_meta
    from .slices import parse_modalities

    config = _preprocessing(args)
    verdict = check_dataset(args.data, split="training")  # what `validate --data` checks: nothing bad is cached
    if verdict.problems:
        raise problems_error(verdict.problems, args.data)
    if verdict.note():
        print(f"autocnnp: note: {verdict.note()}", file=sys.stderr)
    cache = Path(args.cache)
    meta_file = cache / META_FILE
    before = meta_file.stat().st_mtime_ns if meta_file.is_file() else None
    start = time.perf_counter()
    build_cache(args.data, cache, n_slices=config.slices_per_volume, size=config.size,
                modalities=parse_modalities(config.modalities), mode=config.slice_mode, normalise=config.normalise,
                foreground_fraction=config.foreground_fraction, workers=args.workers, progress=True)
    seconds = time.perf_counter() - start
    meta = read_cache_meta(cache)
    reused = before is not None and meta_file.stat().st_mtime_ns == before
    h, w = meta["size"]
    print(f"{cache}: {meta['count']} slices of {meta['channels']} x {h} x {w} from {len(meta['cases'])} case(s) "
          f"in {seconds:.2f} s{' (up to date, reused)' if reused else ''}")
    return 0


# --------------------------------------------------------------------------------------------
# check-data

def cmd_check_data(args) -> int:
    from .checks import check_dataset
    from .index import read_dataset
    from .preprocess import check_cache, is_cache, read_cache_meta

    cache = is_cache(args.data)
    verdict = check_cache(args.data) if cache else check_dataset(args.data, num_classes=args.num_classes)
    problems = verdict.problems
    if verdict.note():
        print(f"autocnnp: note: {verdict.note()}", file=sys.stderr)
    if problems:
        for p in problems:
            print(p)
        print(f"autocnnp: {args.data}: {len(problems)} problem(s) found", file=sys.stderr)
        return DataError.exit_code
    if cache:
        meta = read_cache_meta(args.data)
        print(f"{args.data}: OK: slice cache of {meta['count']} slices from {len(meta['cases'])} case(s) of "
              f"{meta.get('dataset', '?')!r}")
        return 0
    ds = read_dataset(args.data)
    mods = ", ".join(f"{i}={n}" for i, n in ds.modalities.items()) or "not declared"
    labels = ", ".join(f"{i}={n}" for i, n in ds.labels.items()) or "not declared"
    print(f"{args.data}: OK: {ds.name!r}, {len(ds.training)} labelled and {len(ds.test)} test case(s); "
          f"modalities: {mods}; labels: {labels}")
    return 0


# --------------------------------------------------------------------------------------------
# registration

def add_commands(sub) -> None:
    """Add the data commands to the ``autocnnp`` sub-parsers ``sub``."""
    doc = "write a small seeded synthetic dataset in the Decathlon layout (dataset.json, imagesTr, labelsTr)"
    s = sub.add_parser("synth", help=doc, description=doc)
    s.add_argument("out", help="the dataset folder to write")
    default = _synth_defaults()
    s.add_argument("--kind", choices=("brain", "atrium", "tubes"), default=default["kind"],
                   help="brain: 4 modalities, labels 0-3 (like Task01_BrainTumour); atrium: 1 modality, labels 0-1 "
                        "(like Task02_Heart); tubes: 1 modality, 1 x 1 x 3 mm, label 1 spheres and 2 tubes along z "
                        f"that look alike in every axial slice (3D against 2D); default {default['kind']}")
    s.add_argument("--cases", type=count, default=default["cases"],
                   help=f"labelled training cases (default {default['cases']})")
    s.add_argument("--shape", type=positive, nargs=3, default=list(default["shape"]), metavar=("X", "Y", "Z"),
                   help=f"volume shape in voxels (default {' '.join(map(str, default['shape']))})")
    s.add_argument("--seed", type=int, default=default["seed"], help=f"default {default['seed']}")
    s.add_argument("--test-cases", type=count, default=default["test_cases"],
                   help=f"test cases, their labels in labelsTs/ (default {default['test_cases']})")
    s.set_defaults(func=cmd_synth)

    doc = "build the 2D slice cache of a dataset (what a decathlon job builds before training) and time it"
    s = sub.add_parser("preprocess", help=doc, description=doc)
    s.add_argument("data", help="dataset folder (dataset.json) or CSV index")
    s.add_argument("cache", help="cache folder to write")
    job = "as a decathlon job: "
    s.add_argument("--slices", help=f"slices per volume, 0 for all ({job}slices_per_volume)")
    s.add_argument("--size", help=f"slice size in pixels ({job}size)")
    s.add_argument("--mode", help="even: spread slices over the whole volume, labelled: over its labelled part, mixed: "
                   f"over slices with and without a label in the share --foreground-fraction ({job}slice_mode)")
    s.add_argument("--foreground-fraction", metavar="F", help="--mode mixed: share of the slices taken among those "
                   f"holding a label ({job}foreground_fraction)")
    s.add_argument("--modalities", help=f"'all' or comma-separated modality names or indices ({job}modalities)")
    s.add_argument("--no-normalise", action="store_true", help="skip the per-case z-score")
    s.add_argument("--workers", type=positive, help="processes sharing the cases (default: the cores this process may "
                   "use, at most one per case; small datasets are built in one process)")
    s.set_defaults(func=cmd_preprocess)

    doc = "check a dataset: every file readable, shapes, affines, label values; prints every problem"
    s = sub.add_parser("check-data", help=doc, description=doc)
    s.add_argument("data", help="dataset folder (dataset.json), dataset.json file, CSV index or slice cache folder")
    s.add_argument("--num-classes", type=positive, default=None, help="also check labels are below this")
    s.set_defaults(func=cmd_check_data)
