"""Family plugins shipped with polymodal; each registers through the ``polymodal`` entry-point group."""
