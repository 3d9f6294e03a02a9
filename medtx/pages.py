"""Pages from Jinja2 templates: the provenance report (HTML), model cards and summaries.

The Python gathers what a page shows; the page's wording and markup live in the
templates of the package that writes it (``<package>/templates/``, shipped as package
data). Escaping is the environment's job, not each writer's: an HTML environment
escapes every value it prints unless the code marked it safe (``Markup``: an SVG
plot, a stylesheet); a Markdown environment escapes nothing by itself, so its
templates pass free text through an explicit filter (``md``, given by the caller).
A value that is None prints as nothing in both, never as "None"; a name a template
uses but the code did not pass is an error, not a blank.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jinja2
from markupsafe import Markup


def _blank_none(value: Any) -> Any:
    return "" if value is None else value


@functools.cache
def _environment(package: str, autoescape: bool) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader(package, "templates"),
        autoescape=autoescape,
        undefined=jinja2.StrictUndefined,
        finalize=_blank_none,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    if autoescape:
        env.globals["static"] = functools.partial(_static, env)
    return env


def _static(env: jinja2.Environment, name: str) -> Markup:
    """A static file beside the templates (CSS, script), inlined as it is: the page
    opens offline and fetches nothing."""
    assert env.loader is not None
    return Markup(env.loader.get_source(env, name)[0])


def html_environment(package: str) -> jinja2.Environment:
    """``package``'s HTML templates, every printed value escaped; ``static(name)``
    inlines a file beside them."""
    return _environment(package, True)


def markdown_environment(
    package: str, filters: Mapping[str, Callable[..., str]]
) -> jinja2.Environment:
    """``package``'s Markdown templates with ``filters`` (the escape filter among them)."""
    env = _environment(package, False)
    env.filters.update(filters)
    return env


def macros(env: jinja2.Environment, name: str) -> Any:
    """Template ``name``'s macros as attributes (a page's sections, called one by one)."""
    return env.get_template(name).module
