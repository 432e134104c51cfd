"""rlkd: knowledge distillation of causal LMs with the RLKD ranking loss.

The pieces a user may import into their own trainer:

- ``rlkd_cli.losses``  -- divergences and the ranking loss, pure functions on logits;
- ``rlkd_cli.metrics`` -- consistency rate CR@k and overlap rate OR@k;
- ``rlkd_cli.chunking`` -- the loss over response positions in chunks, LM heads applied per chunk;
- ``rlkd_cli.teacher_cache`` -- reading and writing top-K teacher logit caches;
- ``rlkd_cli.engine``  -- the one training loop behind ``rlkd sft`` and ``rlkd distill``.
"""

__version__ = "0.1.0"
