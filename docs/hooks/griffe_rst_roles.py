"""Griffe extension for the API reference: render the Sphinx roles used in momkit's docstrings.

momkit's docstrings are Google style and refer to other objects with Sphinx roles (:class:`...`,
:func:`...`, :mod:`...`, :meth:`...`, :data:`...`, :attr:`...`). Markdown has no such roles, so this
extension rewrites each one, before the docstring is parsed, into an optional autorefs cross-reference:
a link when the target is documented on the site, inline code otherwise. Relative names are qualified
by the enclosing class or module. A reST literal-block marker (a line ending in ``::``) becomes ``:``,
since the indented block after it is already a Markdown code block.

Registered in ``mkdocs.yml`` under the python handler's ``extensions``; nothing in ``momkit`` imports it.
"""

from __future__ import annotations

import html
import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|data|attr|obj|exc):`(?P<target>~?[\w.]+)`")
LITERAL_MARKER = re.compile(r"(?<=\S)::$", re.MULTILINE)


def _scopes(obj: griffe.Object) -> list[str]:
    """Paths to try a relative name against, innermost first: the class (if any), then the module."""
    scopes = []
    node = obj if obj.kind in (griffe.Kind.CLASS, griffe.Kind.MODULE) else obj.parent
    while node is not None:
        scopes.append(node.path)
        if node.kind is griffe.Kind.MODULE:
            break
        node = node.parent
    return scopes


def _identifier(target: str, obj: griffe.Object) -> str:
    if "." in target and target.split(".", 1)[0] == obj.module.package.name:
        return target
    root = obj.module.package
    for scope in _scopes(obj):
        candidate = f"{scope}.{target}"
        try:
            member = root.get_member(candidate.split(".", 1)[1])
            return member.target_path if member.is_alias else candidate
        except (KeyError, ValueError, IndexError, griffe.AliasResolutionError, griffe.CyclicAliasError):
            continue
    return target


def _rewrite(text: str, obj: griffe.Object) -> str:
    def role(match: re.Match) -> str:
        target = match["target"]
        shown = target.lstrip("~")
        if target.startswith("~"):
            shown = shown.rsplit(".", 1)[-1]
        identifier = _identifier(target.lstrip("~"), obj)
        return (f'<autoref identifier="{html.escape(identifier)}" optional>'
                f"<code>{html.escape(shown)}</code></autoref>")

    return LITERAL_MARKER.sub(":", ROLE.sub(role, text))


class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx roles into optional cross-references once the object tree is complete."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.is_alias or obj.docstring is None:
            return
        obj.docstring.value = _rewrite(obj.docstring.value, obj)
