"""``python -m unimm.eval``: see :mod:`unimm.eval.cli`."""

from unimm.eval.cli import main
from unimm.runtime import set_environment_defaults

set_environment_defaults()
main()
