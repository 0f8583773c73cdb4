"""The errors a user can fix: a bad spec, bad inputs, missing files, a broken plugin installation.

Both are ``ValueError`` subclasses, so code that catches ``ValueError`` keeps working. The command line turns
them (and only them) into one line on stderr and exit status 2; any other exception, such as a bug in a
plugin, keeps its traceback. A plugin raises :class:`SpecError` for what its user can fix.
"""

from __future__ import annotations


class SpecError(ValueError):
    """A mistake the user can fix: a spec, an argument, an input tensor or a file that is not what it must be.

    The message names the offending value and what would be valid.
    """


class PluginError(SpecError):
    """An installed plugin is broken: it fails to import, returns a wrong type, misses a method of its
    contract, or repeats a taken name. The message names the plugin and its distribution."""
