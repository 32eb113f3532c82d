"""The federated loop (DESIGN section 5): the wire format (``wire``), and the client and server
functions built on it. Submodules are imported explicitly; this package imports nothing heavy."""
