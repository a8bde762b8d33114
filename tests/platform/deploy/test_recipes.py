"""The deployment recipes (platform/deploy/) checked without Docker or Kubernetes: they parse, every
ioulab command they run exists in the CLI, the image's build steps are the README's, Ray token
authentication is on everywhere, and MLflow always runs with authentication and --allowed-hosts."""
from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml

from ioulab.platform.cli import build_parser

REPO = Path(__file__).resolve().parents[3]
DEPLOY = REPO / "platform" / "deploy"
IMAGE_ROOT = "/opt/ioulab/"  # where the Dockerfile puts the repository
OPERATORS = {"&&", "||", ";", "|", "&", "(", ")", "((", "))"}
LAUNCHER_COMMANDS = ("initialization_commands", "setup_commands", "head_start_ray_commands",
                     "worker_start_ray_commands")


# -- reading the recipes ---------------------------------------------------------------------------
def shell_commands(script: str) -> list[list[str]]:
    """Simple commands of a shell text (continuations joined, comments dropped), as argv lists."""
    commands = []
    for line in script.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        current: list[str] = []
        for token in lexer:
            if token in OPERATORS or set(token) <= set("<>&|;()"):
                commands.append(current)
                current = []
            else:
                current.append(token)
        commands.append(current)
    return [c for c in commands if c]


def strip_env(argv: list[str]) -> list[str]:
    """argv without leading VAR=value assignments (and `export`)."""
    i = 0
    while i < len(argv) and (re.fullmatch(r"[A-Za-z_]\w*=.*", argv[i]) or argv[i] == "export"):
        i += 1
    return argv[i:]


def launcher() -> dict:
    return yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text())


def k8s() -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / "rayjob.yaml").read_text()) if d]


def of_kind(kind: str) -> list[dict]:
    return [d for d in k8s() if d["kind"] == kind]


def rayjob() -> dict:
    (job,) = of_kind("RayJob")
    return job


def ray_pod_specs() -> list[dict]:
    spec = rayjob()["spec"]["rayClusterSpec"]
    return [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuations joined."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), " ".join(rest.split())))
    return out


def instructions() -> dict[str, str]:
    """Dockerfile instruction -> all its arguments (several ENV lines joined)."""
    out: dict[str, str] = {}
    for word, args in dockerfile():
        out[word] = f"{out[word]} {args}" if word in out else args
    return out


def readme_cluster_script() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("### A cluster", 1)[1].split("\n## ", 1)[0]
    return "\n".join(re.findall(r"```bash\n(.*?)```", section, flags=re.S))


def recipe_scripts() -> dict[str, str]:
    """Every shell text the recipes run, by where it comes from."""
    scripts = {"README": readme_cluster_script()}
    for key in LAUNCHER_COMMANDS:
        for i, command in enumerate(launcher().get(key) or []):
            scripts[f"ray-cluster.yaml {key}[{i}]"] = command
    scripts["rayjob.yaml entrypoint"] = rayjob()["spec"]["entrypoint"]
    for doc in k8s():
        for p, pod in enumerate(_pod_specs(doc)):
            for c in pod.get("initContainers", []) + pod.get("containers", []):
                if c.get("command"):
                    scripts[f"rayjob.yaml {doc['kind']} pod {p} {c['name']}"] = shlex.join(c["command"] + c.get("args", []))
    for i, (word, args) in enumerate(dockerfile()):
        if word == "RUN":
            scripts[f"Dockerfile RUN[{i}]"] = args
    return scripts


def _pod_specs(doc: dict) -> list[dict]:
    if doc["kind"] == "Deployment":
        return [doc["spec"]["template"]["spec"]]
    if doc["kind"] == "RayJob":
        return ray_pod_specs() + [doc["spec"]["submitterPodTemplate"]["spec"]]
    return []


def ioulab_commands() -> list[tuple[str, list[str]]]:
    """(where, argv) of every `ioulab ...` and `python -m ioulab...` the recipes run."""
    found = []
    for where, script in recipe_scripts().items():
        for argv in shell_commands(script):
            argv = strip_env(argv)
            if len(argv) >= 3 and argv[0] in ("python", "python3") and argv[1] == "-m" and argv[2].startswith("ioulab"):
                found.append((where, argv))
            elif "ioulab" in argv:  # also after `ray job submit ... --`
                found.append((where, argv[argv.index("ioulab"):]))
    return found


# -- the checks --------------------------------------------------------------------------------------
def test_manifests_parse():
    cfg = launcher()
    assert cfg["head_node_type"] in cfg["available_node_types"]
    assert {d["kind"] for d in k8s()} == {"PersistentVolumeClaim", "Deployment", "Service", "RayJob"}
    assert rayjob()["spec"]["rayClusterSpec"]["rayVersion"] == "2.60.0"
    names = {d["metadata"]["name"] for d in of_kind("PersistentVolumeClaim")}
    for doc in k8s():
        for pod in _pod_specs(doc):
            for volume in pod.get("volumes", []):
                if "persistentVolumeClaim" in volume:
                    assert volume["persistentVolumeClaim"]["claimName"] in names
    assert dockerfile()[0][0] == "FROM"


def test_recipes_run_ioulab_commands_the_cli_has():
    commands = ioulab_commands()
    assert {" ".join(argv[:2]) for _, argv in commands if argv[0] == "ioulab"} == {"ioulab sweep"}
    assert any(argv[2] == "ioulab.detector.ops.build" for _, argv in commands if argv[0] != "ioulab")
    for where, argv in commands:
        if argv[0] == "ioulab":
            try:
                args = build_parser(argv[1:]).parse_args(argv[1:])
            except SystemExit:
                pytest.fail(f"{where}: {shlex.join(argv)} is not a valid ioulab command line")
            space = REPO / args.space.removeprefix(IMAGE_ROOT)
            assert space.is_file(), f"{where}: {args.space} is not in search_spaces/"
            if args.profile:
                assert args.profile in yaml.safe_load(space.read_text())["profiles"], where
        else:
            module = argv[2]
            assert importlib.util.find_spec(module) is not None, f"{where}: no module {module}"
            options = [a.split("=")[0] for a in argv[3:] if a.startswith("-")]
            assert set(options) <= module_options(module), f"{where}: {shlex.join(argv)}"


@cache
def module_options(module: str) -> set[str]:
    out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return set(re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", out.stdout))


def test_the_image_is_built_with_the_readmes_steps():
    steps = instructions()
    readme = readme_cluster_script()
    runs = [args for word, args in dockerfile() if word == "RUN"]
    (install,) = [r for r in runs if r.startswith("pip install")]
    assert install == "pip install torch==2.14.1 torchvision==0.29.1 && pip install -e ."
    assert install in readme.splitlines()
    (build,) = [r for r in runs if "ioulab.detector.ops.build" in r]
    assert runs.index(build) > runs.index(install)
    # The README's per-node step; the image adds --cuda (no GPU at image build) for sm_80 and sm_90.
    assert "python -m ioulab.detector.ops.build" in readme.splitlines()
    assert build == "python -m ioulab.detector.ops.build --cuda"
    env = steps["ENV"]
    assert 'TORCH_CUDA_ARCH_LIST="8.0;9.0"' in env and "IOULAB_EXTENSIONS_DIR=/opt/ioulab-extensions" in env
    assert steps["FROM"].startswith("nvidia/cuda:13.0")
    assert steps["WORKDIR"] + "/" == IMAGE_ROOT
    allowed = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for word, args in dockerfile():
        if word == "COPY":
            for source in args.split()[:-1]:
                assert (REPO / source).exists() and f"!{source}" in allowed, source


def test_the_op_is_built_once_per_node_before_ray_starts():
    cfg = launcher()
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        (start,) = [c for c in cfg[key] if "ray start" in c]
        assert start.index("python -m ioulab.detector.ops.build") < start.index("ray start"), key
    for pod in ray_pod_specs():
        (init,) = pod["initContainers"]
        assert init["command"][:3] == ["python", "-m", "ioulab.detector.ops.build"]
    readme = readme_cluster_script()
    assert readme.index("python -m ioulab.detector.ops.build") < readme.index("ray start")


def test_ray_token_authentication_is_on_in_every_recipe():
    assert "RAY_AUTH_MODE=token" in instructions()["ENV"].split()
    cfg = launcher()
    starts = [c for key in LAUNCHER_COMMANDS for c in cfg.get(key) or [] if "ray start" in c]
    assert len(starts) == 2
    for command in starts:  # the token comes from the secrets file that file_mounts copies to each node
        assert "RAY_AUTH_MODE=token ray start" in command and ". ~/.ioulab/cluster.env" in command
    assert "~/.ioulab/cluster.env" in cfg["file_mounts"]
    assert "RAY_AUTH_TOKEN=" in (DEPLOY / "ray-cluster.yaml").read_text()
    auth = rayjob()["spec"]["rayClusterSpec"]["authOptions"]
    assert auth["mode"] == "token" and auth["secretName"]
    readme = readme_cluster_script()
    first_ray = readme.index("ray start")
    assert readme.index("export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=") < first_ray
    assert "RAY_AUTH_MODE=disabled" not in "".join(recipe_scripts().values())


def test_mlflow_runs_with_authentication_and_its_stores_off_nfs():
    script = (DEPLOY / "mlflow-server.sh").read_text()
    (server,) = [strip_env(c) for c in shell_commands(script) if "mlflow" in c and "server" in c]
    assert server[:4] == ["exec", "mlflow", "server", "--app-name"] and server[4] == "basic-auth"
    assert "--allowed-hosts" in server and "--artifacts-destination" in server
    assert "MLFLOW_AUTH_CONFIG_PATH=$state/basic_auth.ini" in script

    starts = []  # (where, STATE_DIR, ARTIFACTS, shared root) of every MLflow server a recipe starts
    for where, text in recipe_scripts().items():
        for argv in map(strip_env, shell_commands(text)):
            assert argv[:2] != ["mlflow", "server"], f"{where}: start MLflow with mlflow-server.sh"
            names = [a for a in argv if a.endswith("mlflow-server.sh")]
            if names:
                i = argv.index(names[0])
                starts.append((where, argv[i + 1], argv[i + 2]))
    assert {w.split()[0] for w, _, _ in starts} == {"README", "ray-cluster.yaml", "rayjob.yaml"}
    for where, state, artifacts in starts:
        shared = "$SHARED" if where == "README" else "/shared"
        assert artifacts.startswith(shared) and not state.startswith(shared), where
    (deployment,) = of_kind("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]}
    (state_claim,) = [d for d in of_kind("PersistentVolumeClaim") if d["metadata"]["name"] == claims[mounts["/mlflow"]]]
    assert state_claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    env = {e["name"] for e in pod["containers"][0]["env"]}
    assert {"MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_ALLOWED_HOSTS"} <= env
    for pod in ray_pod_specs():  # trials inherit the credentials from their node
        assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= {e["name"] for e in pod["containers"][0]["env"]}
