"""Flower's deployment engine (optional extra ``flower``, with the harness's ``fed``:
``pip install -e ".[fed,flower]"``), docs/ARCHITECTURE.md §7.

    codec.py          the messages: the wire blob of fed/wire.py as bytes in a ConfigRecord
    flower_config.py  the Flower run config, derived from RunConfig (and the App's defaults)
    client_app.py     the ClientApp: one client of the run per SuperNode (``prepare_run``,
                      then ``PreparedRun.build`` with the setup's shared result)
    server_app.py     the ServerApp: ``Run.run`` over the Grid (GridTransport)

The App itself (``flwr run feddpa_fast/fed/flower/app ...``) is ``app/pyproject.toml``; its
components point at ``client_app:client_app`` and ``server_app:server_app``.
"""
