"""``python -m polymodal.cli``: the same as the ``polymodal`` command."""

from polymodal.cli import main

main()
