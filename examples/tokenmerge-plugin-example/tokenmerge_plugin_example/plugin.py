"""The plugin module the ``tokenmerge`` entry point names: one hook implementation.

tokenmerge imports this module lazily (on the first use of its registry) and calls the hook with
its ``register`` function. Import the strategy inside the hook, so that merely discovering the
plugin stays cheap.
"""

from __future__ import annotations

import tokenmerge


@tokenmerge.extend.hookimpl
def tokenmerge_register_strategies(register):
    from tokenmerge_plugin_example.strategy import GridPoolStrategy

    register(GridPoolStrategy)
