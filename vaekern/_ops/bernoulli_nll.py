"""``bernoulli_nll``: its kernel schemas, fakes and autograd (``_likelihood.LikelihoodOp``).

Math (``vaekern.reference``): per row b, ``nll_b = sum_d l(x_bd, t_bd)`` with the softplus
form for logits or the -100-clamped logs for probabilities, then reduced over rows. Its own
argument is ``bool from_logits``; the gradient of the probabilities is
``(p - t) / max(p(1-p), 1e-12)``, which overflows float16 below p = 1.5e-5 for an upstream
of 1: the backward kernel recomputes it there (see ``_likelihood``).

Double backward through any path raises: the saved gradient has no graph. Under torch.func,
whose ``grad`` always builds a graph, the first order goes through and the error comes
where a second order is taken (``first_order_only``).
"""

from __future__ import annotations

from vaekern._ops._likelihood import LikelihoodOp

OP = LikelihoodOp("bernoulli_nll", "bool from_logits")
SCHEMAS = OP.SCHEMAS
BernoulliNLLFunction = OP.Function
register = OP.register
