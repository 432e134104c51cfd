"""``python -m rlkd_cli ...`` is the same as the ``rlkd`` command (``accelerate launch -m rlkd_cli`` too)."""

from rlkd_cli.cli import main

if __name__ == "__main__":
    main()
