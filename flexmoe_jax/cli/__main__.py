"""``python -m flexmoe_jax.cli``: the same as the ``flexmoe`` console script."""

import sys

from flexmoe_jax.cli import main

sys.exit(main())
