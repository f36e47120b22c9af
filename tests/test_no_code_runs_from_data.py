"""Issue 14, "Also": the good behaviour that already existed is kept, checked over the source with `ast` so that a
new call cannot slip in. No `torch.load` without `weights_only=True`, no `eval`/`exec`, no `shell=True` or
`os.system`, YAML only through `safe_load`, no pickle except RefCOCO's restricted unpickler, `trust_remote_code`
off unless passed, and importing the package opens no network connection."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("modeling_occlip", "modeling_cloc", "processing", "training", "examples", "benchmarks")
SOURCES = sorted(p for d in SOURCE_DIRS for p in (ROOT / d).rglob("*.py"))
# The one place a pickle is read: RefCOCO's refs file, through an unpickler that refuses every class and function.
PICKLE_READER = ROOT / "training" / "public_benchmarks.py"


def calls(tree: ast.AST):
    """Every call in `tree` with its dotted function name ("torch.load", "eval", "self.x.y")."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def keyword(call: ast.Call, name: str):
    """The constant value of keyword `name` in `call`, `...` when absent, None when not a constant."""
    for item in call.keywords:
        if item.arg == name:
            return item.value.value if isinstance(item.value, ast.Constant) else None
    return ...


@pytest.fixture(scope="module")
def trees():
    return {path.relative_to(ROOT): ast.parse(path.read_text(), filename=str(path)) for path in SOURCES}


def test_the_scan_sees_the_package(trees):
    names = {str(p) for p in trees}
    assert {
        "training/trainer.py",
        "training/checkpoint.py",
        "processing/vesl.py",
        "modeling_cloc/modeling_cloc.py",
    } <= names
    # The scan finds what it looks for: the open_clip converter's safe torch.load and the RefCOCO unpickler.
    found = [
        (str(p), name) for p, t in trees.items() for _, name in calls(t) if name in ("torch.load", "_PlainUnpickler")
    ]
    assert ("processing/open_clip_conversion.py", "torch.load") in found
    assert ("training/public_benchmarks.py", "_PlainUnpickler") in found


def unsafe_calls(path, tree) -> list[str]:
    """The calls in `tree` that could run code from data or the shell, each as "path:line name: why"."""
    problems = []
    for call, name in calls(tree):
        where = f"{path}:{call.lineno} {name}"
        if name.endswith("torch.load") and keyword(call, "weights_only") is not True:
            problems.append(f"{where}: without weights_only=True")
        if name in ("eval", "exec", "os.system", "os.popen", "pickle.loads", "pickle.load", "marshal.loads"):
            problems.append(f"{where}: runs code")
        if name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all", "yaml.unsafe_load_all"):
            problems.append(f"{where}: use yaml.safe_load")
        if keyword(call, "shell") not in (..., False):
            problems.append(f"{where}: shell=")
        if name.endswith("np.load") and keyword(call, "allow_pickle") not in (..., False):
            problems.append(f"{where}: allow_pickle")
        if keyword(call, "trust_remote_code") is True:
            problems.append(f"{where}: trust_remote_code=True")
    return problems


def test_the_check_catches_each_unsafe_call():
    snippet = """
torch.load(path)
torch.load(path, weights_only=False)
torch.load(path, weights_only=True)
eval(text)
subprocess.run(cmd, shell=True)
yaml.load(text)
yaml.safe_load(text)
np.load(path, allow_pickle=True)
AutoModel.from_pretrained(name, trust_remote_code=True)
"""
    found = [line.split(": ", 1)[1] for line in unsafe_calls("x.py", ast.parse(snippet))]
    assert found == [
        "without weights_only=True",
        "without weights_only=True",
        "runs code",
        "shell=",
        "use yaml.safe_load",
        "allow_pickle",
        "trust_remote_code=True",
    ]


def test_no_unsafe_loader_eval_or_shell(trees):
    problems = [problem for path, tree in trees.items() for problem in unsafe_calls(path, tree)]
    assert not problems, problems


def test_pickle_is_read_only_by_the_restricted_unpickler(trees):
    importers = sorted(
        str(path)
        for path, tree in trees.items()
        for node in ast.walk(tree)
        if (
            isinstance(node, ast.Import)
            and any(a.name in ("pickle", "dill", "marshal", "shelve", "joblib") for a in node.names)
        )
        or (isinstance(node, ast.ImportFrom) and node.module in ("pickle", "dill", "marshal", "shelve", "joblib"))
    )
    assert importers == [str(PICKLE_READER.relative_to(ROOT))]
    (unpickler,) = [
        node
        for node in ast.walk(trees[PICKLE_READER.relative_to(ROOT)])
        if isinstance(node, ast.ClassDef) and any(ast.unparse(b) == "pickle.Unpickler" for b in node.bases)
    ]
    assert "find_class" in [f.name for f in unpickler.body if isinstance(f, ast.FunctionDef)]
    import io
    import pickle

    from training.public_benchmarks import _PlainUnpickler

    # A pickle naming any function or class is refused before it is looked up, so no reduce hook can run.
    with pytest.raises(ValueError, match="only plain lists, dicts and strings are read"):
        _PlainUnpickler(io.BytesIO(pickle.dumps([{"x": os.system}]))).load()
    assert _PlainUnpickler(io.BytesIO(pickle.dumps([{"ref_id": 1, "sentences": ["a cat"]}], protocol=2))).load() == [
        {"ref_id": 1, "sentences": ["a cat"]}
    ]


def test_trust_remote_code_defaults_to_false(trees):
    defaults = []
    for path, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args
                positional = args.posonlyargs + args.args
                pairs = list(zip(positional[len(positional) - len(args.defaults) :], args.defaults))
                pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
                defaults += [(path, node.lineno, ast.unparse(d)) for a, d in pairs if a.arg == "trust_remote_code"]
            if isinstance(node, ast.AnnAssign) and ast.unparse(node.target) == "trust_remote_code":
                defaults.append((path, node.lineno, ast.unparse(node.value) if node.value else "<none>"))
    assert defaults, "trust_remote_code options exist (VESL's captioner) and must be found"
    assert all(value == "False" for *_, value in defaults), defaults
    from processing.vesl import VeslArguments

    assert VeslArguments(input="in", output_dir="out").trust_remote_code is False


@pytest.mark.slow
def test_importing_the_package_opens_no_connection():
    """Every socket connection and name lookup raises in the child before the imports; HF_HUB_OFFLINE is unset
    so that nothing relies on it."""
    code = """
import socket
def refuse(*args, **kwargs):
    raise AssertionError(f"network use during import: {args!r}")
socket.socket.connect = socket.socket.connect_ex = refuse
socket.create_connection = socket.getaddrinfo = refuse
import modeling_occlip, modeling_cloc, processing, training
import training.trainer, training.evaluate, processing.vesl, processing.open_clip_conversion, processing.region_tasks
import examples.train_cloc, examples.vesl_annotate
print("ok")
"""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    }
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok"
