"""Federation commands of the ``autocnnp`` CLI (nothing here imports torch or flwr):

* ``autocnnp federation certs DIR --sites A,B,C [--host HOST ...]``: a CA, the server's TLS certificate and
  a key per site, for a test federation
* ``autocnnp federation server JOB.xml --sites sites.csv [--certs DIR | --insecure] [--set KEY=VALUE]``
* ``autocnnp federation site JOB.xml --name NAME --key NAME.key [--ca ca.crt | --insecure] [--data DATA]
  [--out DIR] [--evaluate-only] [--server HOST:PORT] [--set KEY=VALUE]``
"""

from __future__ import annotations

from pathlib import Path

from ..core.errors import JobError, Source


def _tls(args, command: str):
    if args.insecure == bool(args.certs if command == "server" else args.ca):
        flag = "--certs DIR" if command == "server" else "--ca ca.crt"
        raise JobError(Source(Path("."), text=f"autocnnp federation {command}"),
                       f"give either {flag} (TLS) or --insecure", f"TLS needs {flag}; --insecure only on a trusted "
                       "network, for trying")


def cmd_certs(args) -> int:
    from .certs import make_certificates

    sites = [s.strip() for s in args.sites.split(",") if s.strip()]
    written = make_certificates(Path(args.folder), sites, args.host or ["127.0.0.1", "localhost"])
    print(f"wrote {len(written)} files to {args.folder}: ca.crt (give it to every site), server.crt and server.key "
          f"(the server's), sites/NAME.key (each site's own), sites.csv with sites/NAME.pub (the server's list)")
    return 0


def cmd_server(args) -> int:
    from .config import federation_of
    from .logs import quiet_flower
    from .server import run_server, server_job
    from .transports import transport_of

    quiet_flower()
    _tls(args, "server")
    job = server_job(Path(args.job), args.set)
    certs = None if args.insecure else tuple(Path(args.certs) / n for n in ("ca.crt", "server.crt", "server.key"))
    fed = federation_of(job)
    return run_server(job, fed, Path(args.sites), certs, args.listen, transport_of(fed).serve)


def cmd_site(args) -> int:
    from .config import federation_of
    from .logs import quiet_flower
    from .site import run_site, site_job
    from .transports import transport_of

    quiet_flower()
    _tls(args, "site")
    job = site_job(Path(args.job), args.set, args.data and Path(args.data), args.out and Path(args.out))
    fed = federation_of(job)
    return run_site(job, fed, args.name, Path(args.key), None if args.insecure else Path(args.ca),
                    "evaluate" if args.evaluate_only else "train", args.server, transport_of(fed).join)


def add_commands(sub) -> None:
    """Add ``autocnnp federation certs|server|site`` to the CLI's sub-parsers ``sub``."""
    doc = "federated training across sites on Flower: the data never leaves a site"
    group = sub.add_parser("federation", help=doc, description=doc).add_subparsers(dest="role", required=True)
    doc = "write a CA, the server's TLS certificate and a key per site, for a test federation"
    s = group.add_parser("certs", help=doc, description=doc)
    s.add_argument("folder", help="the folder to write")
    s.add_argument("--sites", required=True, help="comma-separated site names")
    s.add_argument("--host", action="append", help="a name or address the server is reached by (repeatable; "
                                                   "default 127.0.0.1 and localhost)")
    s.set_defaults(func=cmd_certs)
    for role, fn, doc in (("server", cmd_server, "serve the job's federated rounds (<federation>) to the listed sites"),
                          ("site", cmd_site, "take part in a federation: train the job on this site's data each round")):
        s = group.add_parser(role, help=doc, description=doc)
        s.add_argument("job", help="the XML job file (the same at the server and every site)")
        s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override the job")
        s.add_argument("--insecure", action="store_true", help="no TLS (trusted networks only, for trying)")
        s.set_defaults(func=fn)
    server, site = group.choices["server"], group.choices["site"]
    server.add_argument("--sites", required=True, help="sites.csv: NAME,PUBLIC_KEY_FILE of each site admitted")
    server.add_argument("--certs", help="folder holding ca.crt, server.crt and server.key")
    server.add_argument("--listen", help="HOST:PORT to listen on (default 0.0.0.0 and <federation> server's port)")
    site.add_argument("--name", required=True, help="this site's name, as the server's site list writes it")
    site.add_argument("--key", required=True, help="this site's private key (sites/NAME.key)")
    site.add_argument("--ca", help="the CA certificate that signed the server's (ca.crt)")
    site.add_argument("--data", help="this site's dataset (sets data.train)")
    site.add_argument("--out", help="this site's output folder (sets output)")
    site.add_argument("--evaluate-only", action="store_true", help="an out-of-sample site: score each round's "
                                                                  "consensus model on its data, never train")
    site.add_argument("--server", help="HOST:PORT of the server (default: <federation> server)")
