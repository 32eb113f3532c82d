"""The federated trainer (docs/ARCHITECTURE.md §3): ``config`` (RunConfig), ``runner``
(build_run, Run), the methods (``algorithms``), ``client`` / ``server``, the wire format
(``wire``) and the Flower apps (``flower``). Submodules are imported explicitly; this package
imports nothing heavy."""
