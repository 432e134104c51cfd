"""rlkd: knowledge distillation of causal LMs with the RLKD ranking loss.

The pieces a user may import into their own trainer:

- ``rlkd_cli.losses``  -- divergences and the ranking loss, pure functions on logits;
- ``rlkd_cli.metrics`` -- consistency rate CR@k and overlap rate OR@k;
- ``rlkd_cli.engine``  -- the one training loop behind ``rlkd sft`` and ``rlkd distill``.
"""

__version__ = "0.1.0"
