"""The capacity planner: ``simcost plan train`` and ``simcost plan serve``.

:mod:`simcost.plan.train` searches hardware x devices x parallel plan x micro-batch and
gradient accumulation x checkpointing x method for a whole fine-tuning job;
:mod:`simcost.plan.serve` searches fleets (GPU type x count x TP) and server settings for a
serving SLO. Both price every candidate with the same estimate the ``estimate`` and
``simulate`` commands give, so a plan's numbers are reproducible by the command it names.
"""
