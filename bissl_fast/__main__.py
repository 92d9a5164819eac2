"""``python -m bissl_fast``: the ``bissl-fast`` command."""
import sys

from .cli import main

sys.exit(main())
