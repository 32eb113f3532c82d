"""The federated harness (docs/ARCHITECTURE.md §3; the ``[fed]`` extra): ``run_config``
(RunConfig), ``runner`` (prepare_run, build_run, Run), the methods (``algorithms``),
``client`` / ``server`` / ``training``, the transports (``transport``, ``in_process``), the
wire format (``wire``), the checkpoint's state (``run_state``), the result records
(``results``), the tasks, data and evaluation (``tasks``, ``data``, ``evaluate``), the lexical
suite (``lexical``), the CLI (``cli``, with ``compare``) and the Flower apps (``flower``).
Submodules are imported explicitly; this package imports nothing heavy."""
