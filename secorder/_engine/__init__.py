"""The tape engines: one ATen tape of an evaluation, one registry of op rules, evaluators over it.

Stages, one module each:

* :mod:`~secorder._engine.tape` — recording one evaluation of ``f`` as a tape of ATen ops;
* :mod:`~secorder._engine.rules` — the one registry of per-op rules (keyed by the ATen op),
  shared by every evaluator: whether an op is linear, has curvature, its family of closed forms;
* :mod:`~secorder._engine.taylor` — vᵀHv for batches of probes by one reverse pass and a
  forward Taylor pass per probe batch (Hutchinson's quadratic forms);
* :mod:`~secorder._engine.jet` and :mod:`~secorder._engine.collapsed` — collapsed Taylor mode
  (values, directional derivatives and summed second derivatives in one forward pass) for the
  PDE operators of :mod:`secorder.pde`.
"""
