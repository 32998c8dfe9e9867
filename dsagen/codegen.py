"""Step 5 of the pipeline, render: a template context -> Python source of one kernel module, named
by a content hash (step 6, compile and load, is dsagen/backends/). Jinja runs with StrictUndefined, so a context missing a number is an error
at render time, not a silently broken kernel. The key hashes everything the source depends on:
the context (spec's semantic fields and the schedule), the template text and the dsagen version.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from dataclasses import dataclass
from typing import Any

import jinja2

from .__version__ import __version__
from .lower import kernel_context
from .ops import Op, as_op
from .resources import data_dir


@dataclass(frozen=True)
class GeneratedSource:
    backend: str
    kernel: str
    module_name: str  # spells out every specialization, then the key
    key: str
    source: str


TEMPLATE_PATH_ENV = "DSAGEN_TEMPLATE_PATH"


def _environment(backend: str, op: Op) -> jinja2.Environment:
    root = op.root("templates")
    return _environment_for(backend, os.environ.get(TEMPLATE_PATH_ENV, ""), str(root))


@functools.lru_cache(maxsize=None)
def _environment_for(backend: str, template_path: str, op_root: str) -> jinja2.Environment:
    """Templates come from the folders of $DSAGEN_TEMPLATE_PATH (each holding <backend>/<kernel>.py.j2),
    then the op's own folder (a kernel defined outside dsagen), then dsagen's; an override may
    include the original as "dsagen/<backend>/<name>"."""
    builtin = data_dir("templates")
    extra = [jinja2.FileSystemLoader(str(Path(d) / backend)) for d in template_path.split(os.pathsep) if d]
    if Path(op_root) != builtin:
        extra.append(jinja2.FileSystemLoader(str(Path(op_root) / backend)))
    return jinja2.Environment(
        loader=jinja2.ChoiceLoader([*extra, jinja2.FileSystemLoader(str(builtin / backend)),
                                    jinja2.PrefixLoader({"dsagen": jinja2.FileSystemLoader(str(builtin))})]),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )


def _template_text(backend: str, op: Op, name: str) -> str:
    """The text of a template and of everything it includes, recursively: what the key must hash."""
    import jinja2.meta

    env = _environment(backend, op)
    seen: list[str] = []
    todo = [name]
    texts = []
    while todo:
        current = todo.pop(0)
        if current in seen:
            continue
        seen.append(current)
        text = env.loader.get_source(env, current)[0]  # type: ignore[union-attr]
        texts.append(text)
        todo.extend(n for n in jinja2.meta.find_referenced_templates(env.parse(text)) if n)
    return "".join(texts)


def template_name(backend: str, op: Op, variant: str | None = None) -> str:
    """The template of `op`'s variant (None: its first, or its only one) on `backend`."""
    return f"{op.variant(backend, variant).template}.py.j2"


def template_digest(backend: str, kernel: str | Op, variant: str | None = None) -> str:
    """A short hash of the template of `kernel` (its variant `variant`) and its includes: changes
    whenever the generated code can."""
    op = as_op(kernel)
    return hashlib.sha256(_template_text(backend, op, template_name(backend, op, variant)).encode()).hexdigest()[:8]


def render(backend: str, context: dict[str, Any], op: Op | None = None) -> GeneratedSource:
    """The module a context renders to (`op`: the context's kernel, when the caller holds it); the
    context's variant names the template."""
    op = op or as_op(context["kernel"])
    kernel = op.name
    name = template_name(backend, op, context.get("variant"))
    env = _environment(backend, op)
    template_text = _template_text(backend, op, name)
    digest = hashlib.sha256()
    digest.update(json.dumps(context, sort_keys=True).encode())
    digest.update(template_text.encode())
    digest.update(__version__.encode())
    key = digest.hexdigest()[:16]
    source = env.get_template(name).render(
        **context, key=key, template=name, dsagen_version=__version__)
    return GeneratedSource(backend, kernel, f"{context['module_stem']}_{key}", key, source)


def generate(spec, op: Op, resolved, backend: str) -> GeneratedSource:
    """Lower and render one resolved schedule (dsagen.resolve.Resolved) into its module's source:
    for CPU tensors, the Triton interpreter's rendering."""
    interpret = resolved.device_type == "cpu" and backend == "triton"
    return render(backend, kernel_context(spec, op, resolved.point, backend, interpret, resolved.variant), op)
