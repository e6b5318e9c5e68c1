"""``python -m polymodal``: the same as the ``polymodal`` command (what ``torchrun -m polymodal train …`` runs)."""

from polymodal.cli import main

main(prog_name="polymodal")
