"""The federated loop (docs/DESIGN.md §5): the wire format (``wire``), and the client and server
functions built on it. Submodules are imported explicitly; this package imports nothing heavy."""
