"""How the server and the sites talk, chosen by ``<federation transport>``; everything above it (strategies,
rounds, admission of a site's job, audit, tracking, checkpoints, a site's training) is the same for both.

* ``grpc`` (the default): Flower's server and client in the commands' own processes; a site proves who it is by
  signing the server's challenge (server.py's :func:`~autocnnp.federation.server.serve_grpc`, site.py's
  :func:`~autocnnp.federation.site.join_grpc`).
* ``deployment``: Flower's Deployment Engine, a SuperLink beside the server and a SuperNode beside each site,
  with Flower's node authentication (deployment.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from . import deployment, server, site


@dataclass(frozen=True)
class Transport:
    serve: Callable  # (setup, fed, sites, certs, listen, audit): run the rounds that setup(identity) makes
    join: Callable  # (client, address, ca, key_file, timeout_s, folder): take part until the server ends (ca: certs.py)


def transport_of(fed) -> Transport:
    """The transport ``fed`` (a FederationConfig) names (the commands pass its functions to ``run_server`` and
    ``run_site``)."""
    return {"grpc": Transport(server.serve_grpc, site.join_grpc),
            "deployment": Transport(deployment.serve, deployment.join)}[fed.transport]
