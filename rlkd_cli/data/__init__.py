"""Data: the ``dataset`` config group (:mod:`rlkd_cli.data.dataset`, rows from :mod:`rlkd_cli.data.sources`),
the embedded synthetic task (:mod:`rlkd_cli.data.synthetic`), tokenizers (:mod:`rlkd_cli.data.tokenizer`)
and the training loader (:mod:`rlkd_cli.data.loader`: a resumable seeded sampler and a collator)."""
