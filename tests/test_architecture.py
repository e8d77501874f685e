"""The layering of docs/architecture.md, checked from the imports (see tests/layering.py)."""

from __future__ import annotations

import layering

MAX_LINES = 600
#: Modules allowed past MAX_LINES, with the reason (none today).
LONG_MODULES: dict[str, str] = {}


def _kinds(findings, kind):
    return [f.text for f in findings if f.kind == kind]


def test_imports_point_down_the_layers_and_close_no_cycle():
    findings = layering.check(layering.module_sources())
    assert not findings, "\n".join(f"{f.kind}: {f.text}" for f in findings)


def test_an_upward_import_inside_a_function_is_caught():
    sources = layering.module_sources()
    sources["graphlora.quant.qtypes"] += (
        "\n\ndef _sneaky():\n    from graphlora.model import LoraModel\n    return LoraModel\n"
    )
    upward = _kinds(layering.check(sources), "upward")
    assert len(upward) == 1
    assert upward[0].startswith("graphlora.quant.qtypes:")
    assert "imports graphlora.model inside a function" in upward[0]
    assert "'tensors' may not import from 'model'" in upward[0]


def test_a_cycle_within_one_layer_is_caught():
    sources = layering.module_sources()
    sources["graphlora.version"] += "\nfrom graphlora.errors import GraphloraError\n"
    sources["graphlora.errors"] += "\nfrom graphlora.version import __version__\n"
    findings = layering.check(sources)
    assert _kinds(findings, "upward") == []
    assert _kinds(findings, "cycle") == ["import cycle: graphlora.errors -> graphlora.version"]


def test_importing_the_package_root_is_an_upward_import():
    sources = layering.module_sources()
    sources["graphlora.sites"] += "\nimport graphlora\n"
    upward = _kinds(layering.check(sources), "upward")
    assert len(upward) == 1 and "imports graphlora at module level" in upward[0]


def test_type_checking_imports_do_not_count():
    sources = layering.module_sources()
    sources["graphlora.quant.qtypes"] += (
        "\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from graphlora.model import LoraModel\n"
    )
    assert layering.check(sources) == []


def test_a_new_module_needs_a_layer():
    sources = layering.module_sources()
    sources["graphlora.newthing"] = "x = 1\n"
    assert _kinds(layering.check(sources), "unplaced") == [
        "graphlora.newthing belongs to no layer (add it to LAYERS)"
    ]


def test_every_allowed_upward_import_is_still_made():
    """An exception nobody needs any more is removed, not kept as a hole in the rules."""
    sources = layering.module_sources()
    made = {
        (imp.importer, imp.imported)
        for name, source in sources.items()
        for imp in layering.imports_of(name, source, sources)
    }
    for importer, imported in layering.ALLOWED_UPWARD:
        assert any(i == importer and (t == imported or t.startswith(imported + ".")) for i, t in made), (
            f"ALLOWED_UPWARD lists {importer} -> {imported}, which no longer happens"
        )


def test_modules_stay_small():
    too_long = {}
    for path in sorted(layering.ROOT.rglob("*.py")):
        lines = len(path.read_text(encoding="utf-8").splitlines())
        name = str(path.relative_to(layering.ROOT.parent))
        if lines > MAX_LINES and name not in LONG_MODULES:
            too_long[name] = lines
    assert not too_long, f"modules over {MAX_LINES} lines (split them, or add the reason): {too_long}"
