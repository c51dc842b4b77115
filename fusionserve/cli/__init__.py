"""The ``fusionserve`` command line, above every other layer.

``main`` assembles the subcommands each part registers (``export.cli``, ``server.cli``,
``client.cli``) and the end-to-end ``demo``.
"""
