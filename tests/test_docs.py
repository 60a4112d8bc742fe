"""The README and the documentation site (docs/, mkdocs.yml): the README's length and links, the tests page against
tests/, the defaults table against the code, the API reference against `lorafa.__all__`, and where the legacy tables
live. (`mkdocs build --strict`, run by CI, checks every page's links and anchors and every API reference.)"""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
LINK = re.compile(r"\]\((?!https?:|mailto:|#)([^)\s#]+)(?:#[^)\s]*)?\)")
GENERATED = re.compile(r"^<!-- generated: ([\w.-]+) ", re.M)


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _without_code(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def test_readme_is_at_most_200_lines_and_its_links_resolve():
    text = _text(README)
    assert len(text.splitlines()) <= 200, "the README is read in five minutes: move sections to docs/"
    targets = LINK.findall(_without_code(text))
    assert targets, "the README links to the documentation pages"
    missing = [t for t in targets if not (ROOT / t).exists()]
    assert not missing, f"README links to files that do not exist: {missing}"
    assert {"docs/getting_started.md", "docs/methods.md", "docs/defaults.md", "docs/performance.md",
            "docs/tests.md", "docs/reference/lorafa.md"} <= set(targets)


def test_every_test_file_is_listed_on_the_tests_page():
    page = _text(DOCS / "tests.md")
    listed = set(re.findall(r"^\| `(test_\w+\.py)` \|", page, re.M))
    files = {p.name for p in (ROOT / "tests").glob("test_*.py")}
    assert not files - listed, f"docs/tests.md does not list {sorted(files - listed)}: add one line for each"
    assert not listed - files, f"docs/tests.md lists files that do not exist: {sorted(listed - files)}"


def _nav_pages(nav) -> list[str]:
    out = []
    for item in nav:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        out += _nav_pages(value) if isinstance(value, list) else [value]
    return out


def test_every_docs_page_is_in_the_site_navigation():
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load(_text(ROOT / "mkdocs.yml"))
    nav = _nav_pages(config["nav"])
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert set(nav) == pages, (f"pages missing from mkdocs.yml's nav: {sorted(pages - set(nav))}; nav entries "
                               f"without a page: {sorted(set(nav) - pages)}")


def test_the_api_reference_covers_the_public_api():
    import lorafa

    reference = "\n".join(_text(p) for p in (DOCS / "reference").glob("*.md"))
    documented = set(re.findall(r"^::: ([\w.]+)", reference, re.M))
    # `::: lorafa` renders every name in lorafa.__all__ (griffe follows __all__)
    assert "lorafa" in documented and lorafa.__all__
    public = {"lorafa.lr", "lorafa.compat", "lorafa.integrations", "lorafa.optim", "lorafa.ranks", "lorafa.align",
              "lorafa.stats", "lorafa.methods", "lorafa.config", "lorafa.terms", "lorafa.kasa", "lorafa.goat",
              "lorafa.lora_pro", "lorafa.quant", "lorafa.data", "lorafa.eval", "lorafa.models", "lorafa.runconfig",
              "lorafa.peft_bridge", "lorafa.saving", "lorafa.fsdp", "lorafa.plan", "lorafa.weights",
              "lorafa.auto_rank", "lorafa.methods.line_search", "lorafa.data.answers", "lorafa.sweeps", "lorafa.zero3"}
    assert public <= documented, f"modules without an API page: {sorted(public - documented)}"


LEGACY_BLOCKS = {"causal_convergence", "causal_convergence_brief", "cls_convergence", "cls_convergence_brief",
                 "cls_probe_convergence", "targets"}


def test_legacy_tables_live_only_in_the_appendix_and_performance_leads_with_the_validated_results():
    for path in [README, *DOCS.rglob("*.md")]:
        names = set(GENERATED.findall(_text(path)))
        if path.name == "legacy.md":
            assert LEGACY_BLOCKS <= names
        else:
            assert not names & LEGACY_BLOCKS, f"{path.relative_to(ROOT)} shows legacy-protocol tables"
    assert GENERATED.findall(_text(DOCS / "performance.md"))[0] == "which_init"
    assert "which_init" in GENERATED.findall(_text(README))


# -- the defaults table (docs/defaults.md) ------------------------------------------------------------------------
LIBRARY_CELL = re.compile(r"`(InitConfig|LoraConfig|TrainingArguments)\.(\w+) = ([^`]+)`")
RUNNER_CELL = re.compile(r"`(model|init|peft|align|dataset|eval)\.(\w+) = ([^`]+)`")
PRESET = re.compile(r"\((conf/[\w/]+\.yaml)\)")  # a runner cell's values come from this preset, not the defaults
DEFAULT_GROUPS = {"model": "model/smollm2.yaml", "init": "init/gradient.yaml", "peft": "peft/all.yaml"}


def _dataclass_default(cls, name: str):
    field = {f.name: f for f in dataclasses.fields(cls)}[name]
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def _library_default(owner: str, name: str):
    if owner == "InitConfig":
        from lorafa import InitConfig as cls
    elif owner == "LoraConfig":
        from peft import LoraConfig as cls
    else:
        from transformers import TrainingArguments as cls
    return _dataclass_default(cls, name)


def _same(documented, actual) -> bool:
    if isinstance(documented, float) or isinstance(actual, float):
        return actual is not None and float(documented) == float(actual)
    return documented == actual


def test_the_defaults_table_matches_the_library_and_the_runner():
    from omegaconf import OmegaConf

    from lorafa.runconfig import RunConfig

    rows = [r for r in _text(DOCS / "defaults.md").splitlines() if r.startswith("| ") and "---" not in r][1:]
    assert rows, "docs/defaults.md has its table"
    conf = ROOT / "src" / "lorafa" / "conf"
    checked = 0
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split(" | ")]
        library, runner = cells[1], cells[2]
        for owner, name, value in LIBRARY_CELL.findall(library):
            documented, actual = ast.literal_eval(value), _library_default(owner, name)
            assert _same(documented, actual), f"docs/defaults.md: {owner}.{name} = {value}, the code says {actual!r}"
            checked += 1
        preset = PRESET.search(runner)
        for section, name, value in RUNNER_CELL.findall(runner):
            documented, yaml_file = ast.literal_eval(value), preset and preset.group(1)
            sources = {}
            if yaml_file:
                sources[yaml_file] = OmegaConf.to_container(OmegaConf.load(ROOT / "src" / "lorafa" / yaml_file))[name]
            else:
                sources["lorafa/runconfig.py"] = getattr(getattr(RunConfig(), section), name)
                group = conf / DEFAULT_GROUPS[section] if section in DEFAULT_GROUPS else None
                if group is not None and name in OmegaConf.load(group):
                    sources[f"conf/{DEFAULT_GROUPS[section]}"] = OmegaConf.to_container(OmegaConf.load(group))[name]
            for where, actual in sources.items():
                assert _same(documented, actual), (f"docs/defaults.md: {section}.{name} = {value}, {where} says "
                                                   f"{actual!r}")
            checked += 1
    assert checked >= 15, f"only {checked} values in docs/defaults.md were read: is the table's format intact?"
