"""What the daemon, the trainer, the merger and the command line share: atomic file publishing
(``fsutil``), the embedded tiny model (``tiny_model``) and the stub generator (``protogen``).

adapterd's import root is the repository itself: ``adapterd.server`` is ``server/``, ``adapterd.trainer`` is
``trainer/``, ``adapterd.clients`` is ``clients/``, ``adapterd.cli`` is ``cli/``, ``adapterd.common`` is this
folder, and ``adapterd.v1`` (the generated stubs) is ``proto/adapterd/v1/``.
"""

__version__ = "0.1.0"
