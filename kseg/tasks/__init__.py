"""Model families as tasks: one folder each, peers that never import one another (see base.py)."""
