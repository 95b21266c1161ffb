"""The conda environments (envs/*.yaml, for `snakemake --sdm conda`).

1. Their pins are pyproject.toml's.
2. They are layered: core.yaml is in every env, and each stack env is its base plus its stack:
       core.yaml                                  numerics, imaging, figures, Snakemake
       torch.yaml   = core.yaml  + TORCH_STACK    the SR models, their training loop, LPIPS
       nnunet.yaml  = torch.yaml + NNUNET_STACK   nnU-Net
       open3d.yaml  = core.yaml  + OPEN3D_STACK   the ROI placement
       femursr.yaml = all of pyproject.toml's dependencies (every stack in one env)
3. Every rule's env provides what its script imports: at import time (read from the source with
   `ast`: the script's module-level code, the femursr modules that code imports, transitively) and
   for its work (LAZY: the imports inside functions, read from the scripts and the functions they
   call), for the default config and for the nnunet backends of the femur and bone masks.
"""

import ast
import os
import re
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from femursr.provenance import import_names

SCRIPTS = REPO / "workflow_scripts"
ENVS = REPO / "envs"

TORCH_STACK = {"torch", "torchvision", "diffusers", "timm", "lpips", "tensorboard", "tqdm"}
NNUNET_STACK = {"nnunetv2", "dynamic-network-architectures", "batchgenerators", "batchgeneratorsv2", "acvl-utils", "blosc2"}
OPEN3D_STACK = {"open3d-cpu"}
#: env -> (the env it extends, the distributions it adds); femursr.yaml is checked against pyproject
LAYERS = {
    "core.yaml": (None, set()),
    "torch.yaml": ("core.yaml", TORCH_STACK),
    "nnunet.yaml": ("torch.yaml", NNUNET_STACK),
    "open3d.yaml": ("core.yaml", OPEN3D_STACK),
}

#: import name (or dotted prefix) -> the distribution that provides it
DISTRIBUTION = {
    "numpy": "numpy", "scipy": "scipy", "pandas": "pandas", "yaml": "pyyaml", "jsonschema": "jsonschema",
    "SimpleITK": "simpleitk", "pydicom": "pydicom", "numba": "numba", "edt": "edt", "skimage": "scikit-image",
    "matplotlib": "matplotlib", "mpl_toolkits": "matplotlib", "nibabel": "nibabel", "snakemake": "snakemake",
    "psutil": "psutil", "torch": "torch", "torch.utils.tensorboard": "tensorboard", "torchvision": "torchvision",
    "diffusers": "diffusers", "timm": "timm", "lpips": "lpips", "tensorboard": "tensorboard", "tqdm": "tqdm",
    "nnunetv2": "nnunetv2", "dynamic_network_architectures": "dynamic-network-architectures",
    "batchgenerators": "batchgenerators", "batchgeneratorsv2": "batchgeneratorsv2", "acvl_utils": "acvl-utils",
    "blosc2": "blosc2", "open3d": "open3d-cpu",
}  # fmt: skip

_NNUNET = {"torch", "nnunetv2"}
_SR = {"torch", "diffusers", "timm"}  # a model built by name from femursr.sr.registry
_TRAIN = _SR | {"torchvision", "tensorboard", "tqdm"}  # VGG19 perceptual loss, TensorBoard, progress
_ROIS = {"open3d-cpu", "scikit-image", "edt", "matplotlib"}  # surfaces, matching, outline closing, QC
#: rule -> the distributions its work imports inside functions (read from the script and the
#: femursr functions it calls); a dict keys them by the rule's backend (BACKEND)
LAZY = {
    "synthesize_subject": {"nibabel"},  # the HR written slab by slab (VolumeWriter)
    "truth_morphometry": set(),
    "synthesize_cohort": {"matplotlib"},  # the preview (femursr.figures)
    "import_scan": {"nibabel"},  # VolumeWriter
    "register": {"nibabel", "matplotlib"},  # memory-mapped volumes, the QC figure
    "resample_lr": {"nibabel"},
    "femur_mask": {"threshold": {"nibabel"}, "nnunet": _NNUNET | {"nibabel"}},
    "normalize": {"nibabel"},
    "preprocessing_accuracy": set(),
    "nnunet_dataset": {"pydicom"},  # labelled CTs read by femursr.imaging
    "nnunet_plan": _NNUNET,
    "nnunet_train": _NNUNET,
    "bone_nnunet_dataset": {"edt", "nibabel"},
    "bone_nnunet_plan": _NNUNET,
    "bone_nnunet_train": _NNUNET,
    "split": set(),
    "train_autoencoder": _TRAIN,
    "train_sr": _TRAIN,
    "sr_infer": _SR | {"nibabel"},
    "sr_infer_sampled": _SR | {"nibabel"},
    "select_templates": {"nibabel"},
    "template_labels": {"matplotlib"},
    "templates": {"scikit-image", "matplotlib"},  # marching cubes; no Open3D (sampling is ours)
    "bone_mask": {"threshold": {"nibabel"}, "nnunet": _NNUNET | {"nibabel"}},
    "place_rois": _ROIS,
    "roi_morphometry": {"nibabel"},
    "morphometry_table": set(),
    "roi_accuracy": set(),
    "image_quality": {"lpips", "torch", "torchvision"},  # LPIPS (AlexNet)
    "figure1": {"nibabel", "edt"},
    "figure_sample_sd": {"nibabel", "edt"},
    "agreement_plots": set(),
    "results_tables": set(),
    "clinical_export_model": {"simpleitk"},
    "clinical_prepare": {"simpleitk", "scipy"},  # threshold femur mask, resampling
    "clinical_sr": _SR,
    "clinical_evaluate": {"threshold": _ROIS | {"numba"}, "nnunet": _ROIS | {"numba"} | _NNUNET},
    "clinical_table": set(),
}
#: rules whose LAZY entry depends on a backend -> the config key of that backend
BACKEND = {
    "femur_mask": ("preprocessing", "mask", "backend"),
    "bone_mask": ("evaluation", "bone_mask", "backend"),
    "clinical_evaluate": ("evaluation", "bone_mask", "backend"),
}


# ------------------------------------------------------------------ pins and layers
def _pins(reqs):
    out = {}
    for r in reqs:
        m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*==\s*([^\s;]+)\s*", r)
        assert m, f"not pinned exactly: {r!r}"
        out[m.group(1).lower()] = m.group(2)
    return out


def _project():
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _env(path):
    return yaml.safe_load(Path(path).read_text())


def _env_pins(path):
    deps = _env(path)["dependencies"]
    pip = next(d["pip"] for d in deps if isinstance(d, dict) and "pip" in d)
    return _pins(pip)


def test_env_pins_agree_with_pyproject():
    project = _project()
    pins = _pins(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        pins.update(_pins(extra))
    envs = sorted(ENVS.glob("*.yaml"))
    assert envs
    for env in envs:
        for name, version in _env_pins(env).items():
            assert pins.get(name) == version, f"{env.name}: {name}=={version}, pyproject has {pins.get(name)}"


def test_envs_are_core_plus_one_stack_each():
    envs = {p.name for p in ENVS.glob("*.yaml")}
    assert envs == set(LAYERS) | {"femursr.yaml"}, f"envs/ holds {sorted(envs)}: declare a new env's layer in LAYERS"
    pins = {name: _env_pins(ENVS / name) for name in envs}
    project = _pins(_project()["dependencies"])
    core = pins["core.yaml"]
    for name in envs:  # every env holds core.yaml's pins
        missing = {k: v for k, v in core.items() if pins[name].get(k) != v}
        assert not missing, f"envs/{name} lacks core.yaml's {missing}"
        spec = _env(ENVS / name)
        assert spec["channels"] == ["conda-forge", "nodefaults"], f"envs/{name}: channels {spec['channels']}"
        assert "python=3.11" in spec["dependencies"], f"envs/{name}: not python=3.11 (pyproject: requires-python 3.11)"
    for name, (base, stack) in LAYERS.items():
        if base is None:
            continue
        want = {**pins[base], **{d: project[d] for d in stack}}
        assert pins[name] == want, (
            f"envs/{name} should be {base} plus {sorted(stack)}: extra {sorted(set(pins[name]) - set(want))}, "
            f"missing {sorted(set(want) - set(pins[name]))}"
        )
    # core is what pyproject needs beyond the stacks; femursr.yaml is all of it
    assert set(core) == set(project) - TORCH_STACK - NNUNET_STACK - OPEN3D_STACK
    assert pins["femursr.yaml"] == project


# ------------------------------------------------------------------ what a script imports
def _package_of(path):
    try:
        parts = list(path.relative_to(SCRIPTS).with_suffix("").parts)
    except ValueError:  # a rule script: no relative imports
        return []
    return parts[:-1]


def _module_file(name):
    base = SCRIPTS.joinpath(*name.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _backend_guard(test):
    """``X["backend"] == "value"`` (or !=) -> (value, equal); else None."""
    if (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], (ast.Eq, ast.NotEq))
            and isinstance(test.left, ast.Subscript) and isinstance(test.left.slice, ast.Constant)
            and test.left.slice.value == "backend" and isinstance(test.comparators[0], ast.Constant)):  # fmt: skip
        return test.comparators[0].value, isinstance(test.ops[0], ast.Eq)
    return None


def _guard_value(test, is_script, backend):
    """What an ``if`` test is when the file is imported: True, False or None (unknown: both run)."""
    if isinstance(test, ast.Name) and test.id == "TYPE_CHECKING":
        return False
    if isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING":
        return False
    if (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) and test.left.id == "__name__"
            and isinstance(test.comparators[0], ast.Constant) and test.comparators[0].value == "__main__"):  # fmt: skip
        return is_script  # a rule script runs as __main__, a package module never does
    guard = _backend_guard(test)
    if is_script and guard and backend is not None:  # `opts["backend"] == "nnunet"`: the rule's backend
        value, equal = guard
        return (backend == value) == equal
    return None


def _imports(tree, package, *, lazy, is_script=False, backend=None):
    """Dotted names that a module imports: at import time (the module body and the blocks of if,
    with, try, for, while and class in it, not function bodies), or anywhere when ``lazy``."""
    names = []

    def add(node):
        names.extend(import_names(node, package))

    def visit(stmts):
        for node in stmts:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                add(node)
            elif isinstance(node, ast.If):
                value = _guard_value(node.test, is_script, backend)
                if value is not False:
                    visit(node.body)
                if value is not True:
                    visit(node.orelse)
            elif isinstance(node, (ast.With, ast.AsyncWith, ast.For, ast.AsyncFor, ast.While, ast.ClassDef)):
                visit(node.body)
                visit(getattr(node, "orelse", []))
            elif isinstance(node, ast.Try):
                visit(node.body)
                for h in node.handlers:
                    visit(h.body)
                visit(node.orelse)
                visit(node.finalbody)

    if lazy:
        for node in ast.walk(tree):
            add(node)
    else:
        visit(tree.body)
    return names


def third_party_imports(script, *, lazy=False, backend=None):
    """{import name: first file that imports it} of the third-party modules that ``script``
    imports, following the femursr modules it imports: at import time, or anywhere when ``lazy``
    (then with the SR models that femursr.sr.registry imports by name)."""
    found = {}
    todo = [(Path(script), True)]
    seen = set()
    while todo:
        path, is_script = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        if lazy and path == _module_file("femursr.sr.registry"):
            from femursr.sr.registry import AUXILIARY, MODELS

            todo += [(_module_file(f"femursr.sr.{t.split(':')[0]}"), False) for t in {**MODELS, **AUXILIARY}.values()]
        tree = ast.parse(path.read_text(), filename=str(path))
        for name in _imports(tree, _package_of(path), lazy=lazy, is_script=is_script, backend=backend):
            parts = name.split(".")
            if parts[0] == "femursr":
                for k in range(1, len(parts) + 1):  # importing a.b.c runs a and a.b first
                    f = _module_file(".".join(parts[:k]))
                    if f is not None:
                        todo.append((f, False))
            elif parts[0] not in sys.stdlib_module_names:
                found.setdefault(name, path.relative_to(REPO) if path.is_relative_to(REPO) else path)
    return found


def distributions(imports, where):
    """The distributions that provide the import names (a dotted prefix in DISTRIBUTION counts)."""
    out = set()
    for name in imports:
        parts = name.split(".")
        hits = {DISTRIBUTION[".".join(parts[:k])] for k in range(1, len(parts) + 1) if ".".join(parts[:k]) in DISTRIBUTION}
        assert hits, f"{where}: import {name} ({imports[name]}) is in no env: add it to DISTRIBUTION and its env"
        out |= hits
    return out


def test_import_walker_reads_import_time_imports(tmp_path):
    script = tmp_path / "rule.py"
    script.write_text(
        "import json\n"
        "import open3d\n"
        "from femursr.volume import read_volume\n"
        "def work():\n    import lpips\n"
        "if TYPE_CHECKING:\n    import diffusers\n"
        "with ctx() as log:\n"
        "    try:\n        import tqdm\n    except ImportError:\n        pass\n"
        "    if opts['backend'] == 'nnunet':\n        import nnunetv2\n    else:\n        import edt\n"
        "if __name__ == '__main__':\n    import timm\n"
    )
    names = set(third_party_imports(script, backend="threshold"))
    # femursr.volume's own module-level imports come along; lpips (in a function) and diffusers
    # (typing only) do not, nor nnunetv2 (the other backend)
    assert names == {"open3d", "tqdm", "edt", "timm", "numpy", "SimpleITK"}
    assert "nnunetv2" in third_party_imports(script, backend="nnunet")
    assert {"nnunetv2", "edt"} <= set(third_party_imports(script, backend=None))  # unknown: both
    assert {"lpips", "diffusers", "nibabel"} <= set(third_party_imports(script, lazy=True))


# ------------------------------------------------------------------ the rules' envs
def _rules(configfile, workdir):
    """([(rule, env file, script file, params)] of the rules with a script, config) of the workflow
    parsed through Snakemake's API for ``configfile``."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import ConfigSettings, ResourceSettings, StorageSettings

    with SnakemakeApi() as api:
        w = api.workflow(
            resource_settings=ResourceSettings(),
            config_settings=ConfigSettings(configfiles=[Path(configfile)]),
            storage_settings=StorageSettings(),
            workdir=Path(workdir),
            snakefile=REPO / "Snakefile",
        )
        wf = w._workflow
        out = []
        for r in wf.rules:
            if not r.script:
                continue
            base = Path(str(r.basedir))
            env = (base / r.conda_env).resolve() if isinstance(r.conda_env, str) else None
            params = dict(r.params.items())
            out.append((r.name, env, (base / r.script).resolve(), params))
        return out, wf.config


CONFIGS = {
    "default": {},
    "nnunet": {"preprocessing": {"mask": {"backend": "nnunet"}}, "evaluation": {"bone_mask": {"backend": "nnunet"}}},
}


def _merge(into, extra):
    for k, v in extra.items():
        if isinstance(v, dict):
            _merge(into.setdefault(k, {}), v)
        else:
            into[k] = v
    return into


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def workflow_rules(request, tmp_path_factory):
    """(config name, rules, config) of the workflow parsed for one of CONFIGS."""
    tmp = tmp_path_factory.mktemp(f"envs_{request.param}")
    cfg = _merge(yaml.safe_load((REPO / "config" / "config.yaml").read_text()), CONFIGS[request.param])
    (tmp / "config.yaml").write_text(yaml.safe_dump(cfg))
    cwd = os.getcwd()  # the API changes into the workdir
    try:
        rules, config = _rules(tmp / "config.yaml", tmp)
    finally:
        os.chdir(cwd)
    return request.param, rules, config


def test_every_rule_env_provides_what_its_script_imports(workflow_rules):
    name, rules, config = workflow_rules
    for key in set(BACKEND.values()):  # the configs are what they are meant to be
        want = "nnunet" if name == "nnunet" else "threshold"
        assert config[key[0]][key[1]][key[2]] == want, f"{name} config: {'.'.join(key)} is not {want}"
    problems = []
    for rule, env, script, params in rules:
        if env is None or not env.is_file():
            problems.append(f"rule {rule}: conda env {env} is not a file of envs/")
            continue
        have = set(_env_pins(env))
        options = params.get("options")
        backend = options.get("backend") if isinstance(options, dict) else None
        lacking = {}  # distribution -> the first import that needs it
        for mod, src in sorted(third_party_imports(script, backend=backend).items()):
            for dist in distributions({mod: src}, f"rule {rule}") - have:
                lacking.setdefault(dist, f"{src} imports {mod}")
        for dist, why in sorted(lacking.items()):
            problems.append(f"rule {rule}: {why} at import time; {dist} is not in envs/{env.name}")
        assert rule in LAZY, f"rule {rule}: add the packages its work imports inside functions to LAZY in {__file__}"
        lazy = LAZY[rule]
        if isinstance(lazy, dict):
            key = BACKEND[rule]
            lazy = lazy[config[key[0]][key[1]][key[2]]]
        for dist in sorted(lazy - have):
            problems.append(f"rule {rule}: its work imports {dist} (LAZY); it is not in envs/{env.name}")
    assert not problems, f"{name} config:\n" + "\n".join(problems)


def test_lazy_table_names_what_the_scripts_import(workflow_rules):
    """Every package of LAZY is imported somewhere in the code the rule can reach (the script, the
    femursr modules it imports anywhere, and for the SR rules the models the registry builds by
    name), so the table holds no stale or misspelt entry."""
    name, rules, config = workflow_rules
    for rule, env, script, params in rules:
        have = distributions(third_party_imports(script, lazy=True), f"rule {rule}")
        lazy = LAZY[rule]
        for part in lazy.values() if isinstance(lazy, dict) else [lazy]:
            assert part <= have, f"rule {rule}: LAZY lists {sorted(part - have)}, which its code never imports"

