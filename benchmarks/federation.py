"""Federated training (``autocnnp federation``) on this machine, server and sites as separate processes over TLS.

1. Equivalence: 1 site, 1 local epoch per round, FedAvg, N rounds == the same job trained alone N epochs
   (``autocnnp run``): the largest difference between the two networks' tensors.
2. The FeTS claim on our stand-in: 3 sites whose "scanners" differ (each site's images go through its own
   intensity curve and noise, which a z-score does not undo) and an out-of-sample site; foreground Dice on each
   site's test cases of the consensus model, of each site's local-only model and of central training on the
   pooled data.
3. Overhead: a round's wall time against its slowest local training (serialisation, TLS transport, aggregation,
   the sites' scoring of the consensus), and serialisation + FedAvg aggregation of a 31 M-parameter U-Net.

    python benchmarks/federation.py [--rounds 6] [--cases 8]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from _bench import ROOT, table

CLI = [sys.executable, "-m", "autocnnp"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
SCANNERS = {"a": (1.0, 0.0), "b": (0.5, 0.15), "c": (2.0, 0.05), "o": (0.7, 0.3)}  # site: (gamma, noise)


def sh(folder: Path, *args: str) -> str:
    done = subprocess.run([*CLI, *args], cwd=folder, env=ENV, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"autocnnp {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout


def scanner(folder: Path, gamma: float, noise: float, seed: int) -> None:
    """Each image through this site's intensity curve (|x|^gamma on [0, 1]) plus Gaussian noise."""
    rng = np.random.default_rng(seed)
    for path in sorted((folder / "imagesTr").glob("*.nii.gz")) + sorted((folder / "imagesTs").glob("*.nii.gz")):
        img = nib.load(path)
        x = np.asarray(img.dataobj, dtype=np.float32)
        lo, hi = float(x.min()), float(x.max())
        y = ((x - lo) / max(hi - lo, 1e-6)) ** gamma
        y = y + noise * rng.standard_normal(y.shape).astype(np.float32)
        nib.save(nib.Nifti1Image(y.astype(np.float32), img.affine), path)


def pooled(folder: Path, sites: list[str]) -> Path:
    """One dataset holding every training case of ``sites`` (links, renamed by site)."""
    out = folder / "data_pooled"
    for part in ("imagesTr", "labelsTr"):
        (out / part).mkdir(parents=True)
    meta = json.loads((folder / f"data_{sites[0]}" / "dataset.json").read_text())
    meta["training"], meta["test"] = [], []
    for s in sites:
        for entry in json.loads((folder / f"data_{s}" / "dataset.json").read_text())["training"]:
            pair = {}
            for key in ("image", "label"):
                source = folder / f"data_{s}" / entry[key]
                target = Path(entry[key]).parent / f"{s}_{source.name}"
                (out / target).symlink_to(source)
                pair[key] = f"./{target}"
            meta["training"].append(pair)
    meta["numTraining"], meta["numTest"] = len(meta["training"]), 0
    (out / "dataset.json").write_text(json.dumps(meta))
    return out


def job_file(folder: Path, port: int, rounds: int, min_sites: int, size: int) -> Path:
    text = re.sub(r"<!--.*?-->", "", (ROOT / "xml_configs" / "demo.xml").read_text(), flags=re.S)
    text = re.sub(r"<data .*?</data>", f'<data format="decathlon"><train><path>data_a</path></train>'
                  f'<param name="size">{size}</param><param name="slices_per_volume">8</param></data>', text, flags=re.S)
    text = re.sub(r"<parallelism-degree>\d+", "<parallelism-degree>1", text)
    text = re.sub(r"<CNN_archi.*?</CNN_archi>", '<CNN_archi name="unet"><param name="depth">3</param>'
                  '<param name="base_channels">8</param><param name="norm">group</param></CNN_archi>', text, flags=re.S)
    text = text.replace("</task>", '<monitoring><property name="tensorboard">false</property><property name="plots">'
                        'false</property><property name="progress">false</property></monitoring><federation>'
                        f'<property name="server">127.0.0.1:{port}</property><property name="rounds">{rounds}</property>'
                        f'<property name="min_sites">{min_sites}</property></federation></task>')
    text = re.sub(r'name="end_epoch">\d+', f'name="end_epoch">{rounds}', text)
    text = re.sub(r'name="minibatch_size">\d+', 'name="minibatch_size">8', text)
    path = folder / f"job{min_sites}.xml"
    path.write_text(text)
    return path


def federate(folder: Path, job: Path, sites: list[str], tag: str, evaluate_only=()) -> str:
    """Run the federation to its end; the server's console."""
    procs = []
    try:
        server = subprocess.Popen([*CLI, "federation", "server", job.name, "--sites", "certs/sites.csv", "--certs",
                                   "certs", "--set", f"output=server_{tag}"], cwd=folder, env=ENV, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(server)
        for s in [*sites, *evaluate_only]:
            procs.append(subprocess.Popen(
                [*CLI, "federation", "site", job.name, "--name", s, "--key", f"certs/sites/{s}.key", "--ca",
                 "certs/ca.crt", "--data", f"data_{s}", "--out", f"site_{tag}_{s}",
                 *(["--evaluate-only"] if s in evaluate_only else [])], cwd=folder, env=ENV,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        out, _ = server.communicate(timeout=3600)
        if server.returncode:
            raise SystemExit(f"the federation server failed:\n{out[-3000:]}")
        return out
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait()


def dice(checkpoint: Path, data: Path, out: Path) -> float:
    """Mean foreground Dice of ``checkpoint`` over the test cases of ``data``."""
    from autocnnp import api

    with contextlib.redirect_stdout(io.StringIO()):  # its line per volume
        api.predict(api.PredictOptions(checkpoint=str(checkpoint), input=data, out=out))
    scores = []
    for ref in sorted((data / "labelsTs").glob("*.nii.gz")):
        y, p = np.asarray(nib.load(ref).dataobj) > 0, np.asarray(nib.load(out / ref.name).dataobj) > 0
        scores.append(2 * (y & p).sum() / max(1, y.sum() + p.sum()))
    return float(np.mean(scores))


def latest(run: Path) -> Path:
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()


def unet_31m_overhead(sites: int = 3) -> tuple[int, float, float]:
    """Parameters of a depth-5, 64-channel U-Net; seconds to serialise and deserialise ``sites`` copies, and to
    aggregate them (FedAvg)."""
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.strategy.aggregate import aggregate

    from autocnnp import api

    gen = api.load(ROOT / "xml_configs" / "demo.xml", {"architecture.depth": 5, "architecture.base_channels": 64}).generator
    net = gen.action("architecture_injection").build(in_channels=4, num_classes=4)
    arrays = [t.detach().numpy() for t in net.state_dict().values()]
    count = sum(a.size for a in arrays)
    start = time.perf_counter()
    received = [parameters_to_ndarrays(ndarrays_to_parameters(arrays)) for _ in range(sites)]
    serialise = time.perf_counter() - start
    start = time.perf_counter()
    aggregate([(r, 10) for r in received])
    return count, serialise, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--cases", type=int, default=8)
    p.add_argument("--size", type=int, default=32)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        sh(folder, "federation", "certs", "certs", "--sites", ",".join(SCANNERS))
        for seed, (s, (gamma, noise)) in enumerate(SCANNERS.items()):
            sh(folder, "synth", f"data_{s}", "--kind", "atrium", "--cases", str(args.cases), "--shape", "48", "48", "16",
               "--seed", str(seed + 1), "--test-cases", "2")
            scanner(folder / f"data_{s}", gamma, noise, seed)
        port = socket.create_server(("127.0.0.1", 0)).getsockname()[1]

        # 1. equivalence
        one = job_file(folder, port, args.rounds, 1, args.size)
        sh(folder, "run", one.name, "--set", "output=alone_a", "--set", "data.train=data_a")
        federate(folder, one, ["a"], "one")
        import torch

        alone = list(torch.load(latest(folder / "alone_a"), weights_only=False)["model"].values())
        with np.load(folder / "server_one" / "federation" / "latest.npz") as saved:
            fed = [saved[f"a{i}"] for i in range(len(saved.files))]
        diff = max(float(np.abs(a.numpy() - f).max()) for a, f in zip(alone, fed, strict=True))
        print(f"equivalence: 1 site, FedAvg, {args.rounds} rounds of 1 epoch vs {args.rounds} epochs alone: "
              f"largest tensor difference {diff:.3g}")

        # 2. consensus vs local-only vs pooled
        three = job_file(folder, port, args.rounds, 3, args.size)
        console = federate(folder, three, ["a", "b", "c"], "three", evaluate_only=("o",))
        models = {"consensus (federation)": folder / "server_three" / "checkpoints" / "ckpt-best.pt"}
        for s in "abc":
            sh(folder, "run", three.name, "--set", f"output=alone_{s}", "--set", f"data.train=data_{s}")
            models[f"local-only {s}"] = latest(folder / f"alone_{s}")
        data = pooled(folder, ["a", "b", "c"])
        sh(folder, "run", three.name, "--set", "output=central", "--set", f"data.train={data}")
        models["central, pooled a+b+c"] = latest(folder / "central")
        rows = [[name, *(f"{dice(ckpt, folder / f'data_{s}', folder / 'pred' / name / s):.3f}" for s in SCANNERS)]
                for name, ckpt in models.items()]
        print(f"\nforeground Dice on each site's test cases ({args.rounds} rounds / epochs; o: out-of-sample):")
        print(table(["model", *(f"site {s}" for s in SCANNERS)], rows))

        # 3. overhead
        rounds = re.findall(r"aggregated \d+ site\(s\) \(\w+\) in ([\d.]+) s \(slowest local training ([\d.]+) s\)",
                            console)
        wall, local = (np.mean([float(r[i]) for r in rounds]) for i in (0, 1))
        print(f"\noverhead: a round (3 sites) {wall:.2f} s against its slowest local epoch {local:.2f} s: "
              f"{wall - local:.2f} s ({100 * (wall - local) / local:.0f} %) transport, serialisation, aggregation")
        count, serialise, aggregation = unet_31m_overhead()
        print(f"31 M-parameter U-Net ({count / 1e6:.1f} M): serialise + deserialise 3 sites' parameters "
              f"{serialise:.2f} s, FedAvg aggregation {aggregation:.2f} s")


if __name__ == "__main__":
    main()
