"""``python -m laueflow.cli``: the ``laueflow`` command."""

from . import main

main()
