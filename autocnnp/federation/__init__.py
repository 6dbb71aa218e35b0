"""Federated training across sites on Flower (``flwr``): the data never leaves a site.

A server (``autocnnp federation server``) aggregates the parameters the sites send each round with one of
Flower's strategies; a site (``autocnnp federation site``) trains the job's own run (training/run.py's
build, loop.py's epochs) on its own data for ``local_epochs`` and sends back its parameters and scalar
metrics only. The ``<federation>`` section of the job (config.py) describes the federation; everything
else is the job a site would train alone. Sites join over TLS and prove who they are with a key the
server lists (admission.py); a site whose job differs from the server's in what must agree is refused.
"""
