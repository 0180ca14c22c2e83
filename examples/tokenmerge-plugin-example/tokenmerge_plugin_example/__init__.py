"""An example third-party tokenmerge plugin: the ``grid_pool`` strategy.

Installing the distribution is enough: tokenmerge finds it through the ``tokenmerge`` entry-point
group (see ``plugin.py``).
"""

from __future__ import annotations

from tokenmerge_plugin_example.strategy import GridPoolConfig, GridPoolStrategy

__all__ = ["GridPoolConfig", "GridPoolStrategy"]
__version__ = "0.1.0"
