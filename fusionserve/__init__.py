"""fusionserve: gRPC serving for multimodal (image + text) fusion models on onnxruntime.

This folder is the package root, but ``fusionserve.server``, ``.client``, ``.export``, ``.v1`` and
``.v2`` live in the repository's own top-level folders (pyproject's ``package-dir``). Run from a
checkout (``python -m pytest`` in the repository root puts it first on ``sys.path``), this folder
would hide the installed package and its subpackages: ``extend_path`` adds the installed copy
of ``fusionserve`` to this package's path, so both resolve.
"""

from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)
__version__ = "0.1.0"
