"""MkDocs hook: serve the repository files that the pages link to from outside docs/.

The pages link to benchmark plots (`../benchmarks/results/.../convergence.png`), to benchmarks/README.md and to
examples by relative paths, so the links also work when the markdown is read in the repository. MkDocs only
serves docs/, so this hook adds each such file to the site under `repo/<its path in the repository>` and rewrites
the links to it. A linked markdown file becomes a page (not in the navigation) whose own links are resolved the
same way. A link to a file that does not exist is left as it is, so `mkdocs build --strict` reports it.
"""

from __future__ import annotations

import os
import posixpath
import re

from mkdocs.structure.files import File, InclusionLevel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFIX = "repo"
# an inline link or image target: ](path) or ](path#anchor) or ](path "title"); not URLs, not pure anchors
LINK = re.compile(r"(\]\()(?!https?:|mailto:|#)([^)\s#]+)((?:#[^)\s]*)?(?:\s+\"[^\"]*\")?\))")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


def _source_dir(file: File, docs_dir: str) -> str:
    """The folder the page's relative links are written against: its own folder in the repository."""
    return os.path.dirname(file.abs_src_path) if file.abs_src_path else os.path.join(docs_dir, os.path.dirname(file.src_uri))


def _outside_target(page_dir: str, target: str, docs_dir: str) -> str | None:
    """The repository-relative path of a link target that lies outside docs/ (and exists), else None."""
    path = os.path.normpath(os.path.join(page_dir, target))
    inside_docs = os.path.commonpath([path, docs_dir]) == docs_dir
    inside_root = os.path.commonpath([path, ROOT]) == ROOT
    if inside_docs or not inside_root or not os.path.isfile(path):
        return None
    return os.path.relpath(path, ROOT).replace(os.sep, "/")


def _links(markdown: str):
    masked = FENCE.sub(lambda m: " " * len(m.group(0)), markdown)  # links inside code blocks are not links
    return [m for m in LINK.finditer(masked)]


def on_files(files, config):
    docs_dir = os.path.abspath(config["docs_dir"])
    todo = [f for f in files.documentation_pages()]
    while todo:
        page = todo.pop()
        with open(page.abs_src_path, encoding="utf-8") as fh:
            text = fh.read()
        for m in _links(text):
            rel = _outside_target(_source_dir(page, docs_dir), m.group(2), docs_dir)
            uri = f"{PREFIX}/{rel}" if rel else None
            if uri is None or files.get_file_from_path(uri) is not None:
                continue
            new = File.generated(config, uri, abs_src_path=os.path.join(ROOT, rel), inclusion=InclusionLevel.NOT_IN_NAV)
            files.append(new)
            if new.is_documentation_page():
                todo.append(new)
    return files


def on_page_markdown(markdown, page, config, files):
    docs_dir = os.path.abspath(config["docs_dir"])
    page_dir = _source_dir(page.file, docs_dir)
    here = posixpath.dirname(page.file.src_uri)
    out, last = [], 0
    for m in _links(markdown):
        rel = _outside_target(page_dir, m.group(2), docs_dir)
        if rel is not None:
            target = f"{PREFIX}/{rel}"
        elif page.file.src_uri.startswith(PREFIX + "/"):  # a repository page's link back into docs/
            path = os.path.normpath(os.path.join(page_dir, m.group(2)))
            if os.path.commonpath([path, docs_dir]) != docs_dir:
                continue
            target = os.path.relpath(path, docs_dir).replace(os.sep, "/")
        else:
            continue
        out += [markdown[last:m.start(2)], posixpath.relpath(target, here or ".")]
        last = m.end(2)
    out.append(markdown[last:])
    return "".join(out)
