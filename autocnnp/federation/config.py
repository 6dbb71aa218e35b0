"""The ``<federation>`` section of a job: where the server is, how many rounds, how the sites' parameters
are aggregated."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..core.settings import setting
from ..engine.values import bind_section

AGGREGATIONS = ("fedavg", "fedprox", "fedadam", "fedyogi")


@dataclass
class FederationConfig:
    """Federated training (``autocnnp federation server/site``); the rest of the job is each site's own job."""

    server: str = setting("127.0.0.1:9092", help="HOST:PORT the sites connect to (the server listens on PORT)")
    transport: Literal["grpc", "deployment"] = setting(
        "grpc", help="grpc: the server and sites speak Flower's protocol in the commands' own processes, sites "
                     "sign the server's challenge; deployment: Flower's Deployment Engine (SuperLink and "
                     "SuperNode processes, Flower's node authentication)")
    rounds: int = setting(3, min=1, help="federated rounds: each site trains, the server aggregates")
    local_epochs: int = setting(1, min=1, help="epochs each site trains per round on its own data")
    min_sites: int = setting(2, min=1, help="training sites a round needs: it waits for them, and a round whose "
                                            "results come from fewer keeps the previous model")
    aggregation: Literal["fedavg", "fedprox", "fedadam", "fedyogi"] = setting(
        "fedavg", help="Flower strategy: fedavg (weighted by the sites' training samples), fedprox, fedadam, fedyogi")
    proximal_mu: float = setting(0.01, min=0.0, help="fedprox: weight of the proximal term")
    server_lr: float = setting(0.01, gt=0.0, help="fedadam, fedyogi: the server optimizer's learning rate")
    round_timeout_s: float = setting(600.0, gt=0.0, help="how long the server waits for min_sites sites to "
                                                         "join, and for a round's results")
    select_metric: str = setting("dice_fg", help="the validation metric (weighted over the training sites' "
                                                 "validation samples) by which the consensus model is selected")


def federation_of(job) -> FederationConfig:
    """The job's ``<federation>`` section, bound and checked."""
    spec = job.spec
    return bind_section((FederationConfig,), spec.federation, spec.base_dir, "<federation>")[0]
