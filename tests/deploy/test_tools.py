"""Every deploy file passes the real tool that checks its kind: systemd's own
analyzer for the unit and its drop-ins, systemd-sysusers for the sysusers.d
entry, Kubernetes' own schemas (strict: no unknown field) for every manifest,
and hadolint for the Containerfile.  Each checker is also shown a broken file,
so that a check that stopped checking would fail too."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from .conftest import DEPLOY, tool

SYSTEMD = DEPLOY / "systemd"
UNIT = SYSTEMD / "grant-broker.service"
MANIFESTS = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
CONTAINERFILE = DEPLOY / "container" / "Containerfile"
# The executables of the unit's commands that come with the project, not with the system: laid out in the
# verified root as stand-ins (the install steps of deploy/systemd/README.md put the real ones there).
PROJECT_COMMANDS = {"grant-broker"}
# Where the host's own units are: the verified root gets a copy, so that the unit's dependencies resolve.
HOST_UNITS = Path("/usr/lib/systemd/system")


def drop_ins() -> list[Path]:
    """The files of deploy/systemd/ that are drop-ins of the unit (they have a [Service] or [Unit] section)."""
    return sorted(path for path in SYSTEMD.glob("*.conf") if re.search(r"^\[(Service|Unit)\]$", path.read_text(), re.M))


def executables(unit_text: str) -> set[str]:
    """The absolute program paths of every Exec*= line (its prefixes -@:+! stripped)."""
    found = set()
    for value in re.findall(r"^Exec\w+=(.*)$", unit_text, flags=re.M):
        if value.strip():
            found.add(shlex.split(value)[0].lstrip("-@:+!"))
    return found


def systemd_root(tmp_path: Path, unit_text: str, drop_in: Path | None = None) -> Path:
    """A root for systemd-analyze --root: the host's units, the unit under
    /etc/systemd/system (with *drop_in* in its .d/ directory), and the programs
    its Exec lines name: the project's as stand-ins, the system's copied from this host."""
    root = tmp_path / "root"
    units = root / "etc/systemd/system"
    units.mkdir(parents=True)
    shutil.copytree(HOST_UNITS, root / HOST_UNITS.relative_to("/"), symlinks=True)
    (units / UNIT.name).write_text(unit_text)
    if drop_in is not None:
        (units / f"{UNIT.name}.d").mkdir()
        shutil.copy(drop_in, units / f"{UNIT.name}.d" / drop_in.name)
    for program in executables(unit_text):
        target = root / program.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if Path(program).name in PROJECT_COMMANDS:
            target.write_text("#!/bin/sh\nexit 0\n")
            target.chmod(0o755)
        elif Path(program).exists():
            shutil.copy(program, target)
        # else: left out, and verify says the command is not there
    return root


def verify(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("systemd-analyze"), "verify", f"--root={root}", "--man=no", "--recursive-errors=no", UNIT.name],
        capture_output=True, text=True, timeout=120,
    )


def assert_clean(result: subprocess.CompletedProcess[str]) -> None:
    """Exit 0 and not a line of complaint: systemd-analyze reports an unknown
    key or a bad value on stderr and still exits 0."""
    assert result.returncode == 0 and not result.stderr.strip(), result.stdout + result.stderr


# ------------------------------------------------------------------ systemd


def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    assert_clean(verify(systemd_root(tmp_path, UNIT.read_text())))


@pytest.mark.parametrize("drop_in", drop_ins(), ids=lambda path: path.name)
def test_the_unit_with_each_drop_in_passes_systemd_analyze_verify(tmp_path: Path, drop_in: Path) -> None:
    assert_clean(verify(systemd_root(tmp_path, UNIT.read_text(), drop_in)))


@pytest.mark.parametrize(
    ("breakage", "complaint"),
    [
        (lambda text: text.replace("[Service]\n", "[Service]\nRestartt=always\n", 1), "Unknown key"),
        (lambda text: re.sub(r"^Type=.*$", "Type=sometimes", text, count=1, flags=re.M), "Failed to parse service type"),
        (lambda text: re.sub(r"^ExecStart=\S+", "ExecStart=/usr/bin/no-such-program", text, count=1, flags=re.M), "no-such-program"),
    ],
    ids=["unknown key", "bad value", "missing program"],
)
def test_verify_reports_a_broken_unit(tmp_path: Path, breakage: object, complaint: str) -> None:
    broken = breakage(UNIT.read_text())  # type: ignore[operator]
    assert broken != UNIT.read_text()
    result = verify(systemd_root(tmp_path, broken))
    assert complaint in result.stderr


def test_the_unit_is_exposed_at_most_4_0_by_systemd_analyze_security(tmp_path: Path) -> None:
    """The issue's bar for the hardening (it was 7.1 MEDIUM with Type=exec as root)."""
    result = subprocess.run(
        [tool("systemd-analyze"), "security", "--offline=yes", f"--root={systemd_root(tmp_path, UNIT.read_text())}",
         "--threshold=40", "--no-pager", UNIT.name],
        capture_output=True, text=True, timeout=120,
    )
    level = re.search(r"Overall exposure level for \S+: (\d+\.\d)", result.stdout)
    assert level is not None, result.stdout + result.stderr
    assert result.returncode == 0 and float(level.group(1)) <= 4.0, result.stdout[-2000:]


def sysusers(tmp_path: Path, entry: Path) -> subprocess.CompletedProcess[str]:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True, exist_ok=True)
    return subprocess.run([tool("systemd-sysusers"), "--dry-run", f"--root={root}", str(entry)],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("entry", sorted(SYSTEMD.glob("*.sysusers")), ids=lambda path: path.name)
def test_the_sysusers_entry_passes_systemd_sysusers(tmp_path: Path, entry: Path) -> None:
    result = sysusers(tmp_path, entry)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not re.search(r"ignoring|invalid|failed", result.stderr, flags=re.I), result.stderr


def test_sysusers_reports_a_broken_entry(tmp_path: Path) -> None:
    broken = tmp_path / "broken.conf"
    broken.write_text("u grant-broker - - /nonexistent /usr/sbin/nologin extra-field\nx nonsense\n")
    result = sysusers(tmp_path, broken)
    assert result.returncode != 0 or result.stderr.strip()


# ------------------------------------------------------------------ Kubernetes


def kubernetes_validate(*paths: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("kubernetes-validate"), "--strict", "--quiet", *map(str, paths)],
                          capture_output=True, text=True, timeout=120)


def test_there_are_manifests_to_check() -> None:
    assert MANIFESTS


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda path: path.name)
def test_each_manifest_passes_strict_schema_validation(manifest: Path) -> None:
    result = kubernetes_validate(manifest)
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), result.stdout + result.stderr


def test_strict_validation_reports_an_unknown_field(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    text = (DEPLOY / "kubernetes" / "daemonset.yaml").read_text()
    broken.write_text(re.sub(r"^(\s+)image: ", r"\1imagePullPolicyy: Always\n\1image: ", text, count=1, flags=re.M))
    result = kubernetes_validate(broken)
    assert result.returncode != 0 and "imagePullPolicyy" in result.stdout + result.stderr


# ------------------------------------------------------------------ the Containerfile


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    # Every finding fails, down to the style ones.
    return subprocess.run([tool("hadolint"), "--no-color", "--failure-threshold", "style", str(path)],
                          capture_output=True, text=True, timeout=60)


def test_the_containerfile_passes_hadolint() -> None:
    result = hadolint(CONTAINERFILE)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_hadolint_reports_a_bad_containerfile(tmp_path: Path) -> None:
    broken = tmp_path / "Containerfile"
    broken.write_text(CONTAINERFILE.read_text() + "RUN cd /opt && apt-get install python3\n")
    result = hadolint(broken)
    assert result.returncode != 0 and "DL3003" in result.stdout  # "use WORKDIR to switch to a directory"
