"""The plugin authoring kit (being split into modules by subject)."""

from .strategies import *  # noqa: F403
from .strategies import __all__  # noqa: F401
