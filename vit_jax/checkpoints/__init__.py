"""Checkpoints: parameter trees, the `.npz` naming schemes and layouts, other
libraries' layouts, the train state on disk, resume and export."""
