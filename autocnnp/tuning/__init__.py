"""Tuning large-minibatch training with GreScale (thesis chapter 6), and predicting how a job scales.

``guideline``  the guideline flowchart (thesis Figure 6.3) as a replayable state machine; the
               training run it needs is injected (``runner(variant) -> final metrics``)
``runner``     the real runner: trains a job variant with ``autocnnp run`` machinery in its own folder
``report``     the iteration table (thesis Tables 6.1-6.10) as CSV, text and a plot
``lr_plot``    plots of learning-rate schedules (``autocnnp lr-plot``)
``commands``   the ``autocnnp tune`` and ``autocnnp lr-plot`` subcommands
``scaling``    the performance model: links, a strategy's traffic, data paths, speedup and efficiency
``scale``      ``autocnnp scale``: profiles the job's step, measures a link, R2D2's presets
"""
