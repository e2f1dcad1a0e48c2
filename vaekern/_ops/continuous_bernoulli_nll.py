"""``continuous_bernoulli_nll``: its kernel schemas, fakes and autograd
(``_likelihood.LikelihoodOp``).

Math (``vaekern.reference``, Loaiza-Ganem & Cunningham 2019): the Bernoulli NLL of the same
input plus ``L(eta) = -log C(eta)``, the log normalizer in logit space,
``C(eta) = eta / tanh(eta / 2)`` (2 at eta = 0), so that the density integrates to 1 over
[0, 1]; its own argument is ``bool from_logits`` (probabilities enter through their
clamped logit). ``d/deta = sigmoid(eta) - t + 1/sinh(eta) - 1/eta``; the kernels take L and
L' from a series near eta = 0 and from exp(-|eta|) elsewhere, so nothing cancels or
overflows (see the kernels' headers).
"""

from __future__ import annotations

from vaekern._ops._likelihood import LikelihoodOp

OP = LikelihoodOp("continuous_bernoulli_nll", "bool from_logits")
SCHEMAS = OP.SCHEMAS
ContinuousBernoulliNLLFunction = OP.Function
register = OP.register
