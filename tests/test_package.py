"""The library apart from its lab: what `import sts_trainer` pulls in, and which way the subpackages import."""

import ast
import json
import pathlib
import subprocess
import sys

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "sts_trainer"
CORE = {"architectures", "arguments", "callbacks", "distributed", "flops", "layer_skip", "mixin", "presets", "randomness", "savings",
        "stage", "token_compression", "trainer"}


def imported_modules(path: pathlib.Path, top_level_only: bool = False) -> set[str]:
    """Modules a file imports (anywhere, or at module level only), relative ones resolved to 'sts_trainer.x.y'."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    names = set()
    tree = ast.parse(path.read_text())
    for node in tree.body if top_level_only else ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(part for part in (base, node.module) if part)
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


HEAVY = {"matplotlib", "datasets", "peft", "evaluate", "trl", "deepspeed"}


def modules_after(code: str) -> set[str]:
    code = f"import sys, json; {code}; print(json.dumps(sorted(sys.modules)))"
    return set(json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout))


def test_import_sts_trainer_pulls_in_no_heavy_or_optional_module():
    modules = modules_after("import sts_trainer")
    assert not {name.split(".")[0] for name in modules} & HEAVY
    assert not any(name.startswith("sts_trainer.") for name in modules)  # the exported names load on first use


def test_the_core_adds_no_heavy_module_to_what_transformers_trainer_imports():
    """transformers' own trainer imports datasets and peft where they are installed; the core adds none of the
    heavy modules, and none of sts_trainer's subpackages."""
    ours = modules_after("from sts_trainer import STSTrainer, STSTrainingArguments, TokenCompressor, LayerSkipper")
    transformers_own = modules_after("import transformers.trainer")
    added = {name.split(".")[0] for name in ours - transformers_own}
    assert not added & HEAVY
    assert {name for name in ours if name.startswith("sts_trainer.")} == {f"sts_trainer.{name}" for name in CORE}
    for path in PACKAGE.glob("*.py"):  # and no core module imports one itself (the savings plot: matplotlib, lazily)
        if path.stem in CORE:
            assert not {name.split(".")[0] for name in imported_modules(path, top_level_only=True)} & HEAVY, path.name


def test_the_core_imports_only_the_core_and_the_llava_recipe_not_the_lab():
    for path in PACKAGE.glob("*.py"):
        ours = {name for name in imported_modules(path) if name.startswith("sts_trainer.")}
        assert all(name.split(".")[1] in CORE for name in ours), (path.name, ours)
    for path in (PACKAGE / "llava").rglob("*.py"):
        assert not any(name.startswith("sts_trainer.lab") for name in imported_modules(path)), path


def test_no_import_cycle_between_modules():
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        graph[module] = set()
        for name in imported_modules(path):
            while name and name not in graph and not (PACKAGE.parent / (name.replace(".", "/") + ".py")).exists() \
                    and not (PACKAGE.parent / name.replace(".", "/") / "__init__.py").exists():
                name = name.rpartition(".")[0]
            if name.startswith("sts_trainer") and name != module:
                graph[module].add(name)

    def visit(node, path):
        assert node not in path, " -> ".join([*path, node])
        for nxt in graph.get(node, ()):
            if not nxt.endswith("sts_trainer") and nxt != node:
                visit(nxt, [*path, node])

    for module in graph:
        visit(module, [])


def test_the_two_components_do_not_depend_on_each_other():
    """VTC and LDS take their shared pieces (the rank-synchronised generator) from modules of their own."""
    vtc = imported_modules(PACKAGE / "token_compression.py")
    lds = imported_modules(PACKAGE / "layer_skip.py")
    assert not any(name.startswith("sts_trainer.layer_skip") for name in vtc)
    assert not any(name.startswith("sts_trainer.token_compression") for name in lds)
    assert "sts_trainer.randomness" in vtc and "sts_trainer.randomness" in lds
