"""review: a cytogeneticist's decisions. Label changes with an audit trail (rows supersede, never
overwrite), corrections import, accepting predictions, the files a reviewer must know were not used.

May import: intake, store, and the bottom.
"""
