r"""Distillation losses on next-token logits: divergences, the RLKD ranking loss, and weighted mixes.

Every function here is a pure function of tensors that can be imported into any trainer. The
divergences share one signature::

    name(student_logits, teacher_logits, mask=None, *, temperature=1.0, reduction="mean", **options)

Conventions (all functions):

* ``student_logits`` and ``teacher_logits`` have shape ``[..., V]`` (typically ``[B, T, V]``) and
  are already aligned: position ``t`` of both predicts the same token. Use :func:`align_vocab`
  first when the two vocabularies differ by padding rows.
* Any floating dtype is accepted (fp32, bf16, fp16); everything is computed in float32 (float64
  when the student logits are float64). Inputs are never modified. Outputs are in that compute
  dtype.
* ``mask`` has shape ``[...]`` (the logits' shape without the vocabulary axis), bool or 0/1;
  ``True`` marks a position that counts. ``None`` counts every position. Masked positions are
  never read, so they may hold anything (even NaN) without affecting values or gradients.
* ``reduction``:

  - ``"mean"``: the sum over counted positions divided by their number (an explicit count, not a
    mean over the padded batch). With no counted position the result is a zero that is still
    connected to the autograd graph.
  - ``"sum"``: the sum over counted positions. An engine that evaluates positions in chunks adds
    the chunk sums and divides by the total count itself; the result equals ``"mean"`` on the
    whole batch up to floating-point summation order.
  - ``"none"``: per-position values of shape ``[...]``, with masked positions set to 0.

* ``temperature`` :math:`\tau`: both distributions are :math:`\mathrm{softmax}(z/\tau)`. **No**
  :math:`\tau^2` factor is applied (Hinton et al. multiply the soft loss by :math:`\tau^2` to keep
  gradient magnitudes comparable across temperatures; do that with the term's weight if wanted).
* Numerics: vocabulary entries whose logit is ``-inf`` (a masked vocabulary) and logits of
  magnitude 1e4 give finite values and finite gradients. Log-probabilities are taken with
  ``log_softmax`` and floored at :data:`LOGP_FLOOR` (``-1e6``); an entry with probability exactly
  0 contributes exactly 0 to :math:`\sum p \log(p/q)` (the convention :math:`0 \log 0 = 0`), and
  where the exact divergence would be :math:`+\infty` (the other distribution puts mass on an entry
  this one forbids) the floor makes it large but finite.
* Gradients flow into both logits tensors when they require grad (pass the teacher's logits
  detached, or computed under ``torch.no_grad()``, to treat them as a target). Exceptions,
  stated where they apply: the adaptive weights of :func:`adaptive_kl` and the teacher's ranks in
  :func:`ranking_loss` are never differentiated.

Losses are chosen by name from the ``loss`` config group through the registry :data:`LOSSES`
(canonical names plus short aliases), and mixed by :class:`Objective`. Adding a divergence is one
function decorated with :func:`register_loss` plus one yaml file in ``conf/loss/`` (or, with no
edit of rlkd, a module of yours named in ``loss.plugins``).

The package's modules: ``core`` (conventions, checks, reduction), ``topk`` (top-k selection and
the top-K teacher type :class:`TopKLogits`), ``fused`` (autograd kernels of the forward KL and the
cross-entropy), ``divergences``, ``ranking``, ``registry`` and ``objective``.
"""

from rlkd_cli.losses.core import LOGP_FLOOR, RANK_BIG, RANK_CACHE_MARGIN, RANK_EPS
from rlkd_cli.losses.divergences import (adaptive_kl, align_vocab, apply_divergence, cross_entropy, divergence_rows,
                                         forward_kl, generalized_jsd, js, reverse_kl, skew_kl, skew_reverse_kl, tvd)
from rlkd_cli.losses.objective import Objective
from rlkd_cli.losses.ranking import ranking_loss
from rlkd_cli.losses.registry import (LOSSES, available_losses, canonical_name, get_loss, load_plugins, loss_options,
                                      register_loss)
from rlkd_cli.losses.topk import TopKLogits, lumped_log_probs, top_k

__all__ = [
    "LOGP_FLOOR",
    "LOSSES",
    "RANK_BIG",
    "RANK_CACHE_MARGIN",
    "RANK_EPS",
    "Objective",
    "TopKLogits",
    "adaptive_kl",
    "align_vocab",
    "apply_divergence",
    "available_losses",
    "canonical_name",
    "cross_entropy",
    "divergence_rows",
    "forward_kl",
    "generalized_jsd",
    "get_loss",
    "js",
    "load_plugins",
    "loss_options",
    "lumped_log_probs",
    "ranking_loss",
    "register_loss",
    "reverse_kl",
    "skew_kl",
    "skew_reverse_kl",
    "top_k",
    "tvd",
]
