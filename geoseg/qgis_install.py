"""Install geoseg's QGIS plugin (geoseg/qgis_plugin) into a QGIS profile, remove it, or zip it.

``install`` copies the plugin into ``<QGIS settings>/profiles/NAME/python/plugins/geoseg``,
records there which Python runs geoseg (``environment.json``, which the plugin's
runner names and reads: QGIS's own Python
cannot import torch, so the plugin runs ``PYTHON -m geoseg`` in a subprocess) and
enables the plugin in the profile's ``QGIS/QGIS3.ini``. The QGIS settings folder is
``$QGIS_CUSTOM_CONFIG_PATH`` when set, else QGIS's per-user folder (Linux
``~/.local/share/QGIS/QGIS3``, macOS ``~/Library/Application Support/QGIS/QGIS3``,
Windows ``%APPDATA%\\QGIS\\QGIS3``). Everything is checked before anything is
written, the new plugin folder is built beside the old one and swapped in, and
a failure puts back what was there: nothing is ever half-written.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Mapping

from geoseg import __version__
from geoseg.errors import ConfigError, OutputError, file_error
from geoseg.export import STYLE_FILE, default_style
from geoseg.publish import atomic_output
from geoseg.qgis_plugin.runner import ENVIRONMENT_FILE, child_environment
from geoseg.temporaries import make_temporary_folder, remove_temporary, temporary_path

#: The plugin's folder name in QGIS (= ``name`` in metadata.txt), and its package in geoseg.
PLUGIN_NAME = "geoseg"
PLUGIN_PACKAGE = "qgis_plugin"
#: QGIS's variable for another settings folder (QGIS then uses ``$QGIS_CUSTOM_CONFIG_PATH/profiles/NAME``).
CONFIG_PATH_VARIABLE = "QGIS_CUSTOM_CONFIG_PATH"
DEFAULT_PROFILE = "default"
#: A profile's settings file and the section that lists enabled Python plugins.
SETTINGS_FILE = Path("QGIS") / "QGIS3.ini"
PLUGINS_SECTION = "PythonPlugins"
#: Files of the plugin folder that ship (no caches, no environment record).
SHIPPED_SUFFIXES = (".py", ".txt", ".svg", ".qml")
#: Seconds ``--python`` gets to import geoseg.
PYTHON_CHECK_S = 120


@dataclass(frozen=True)
class PluginInstall:
    """What :func:`install_plugin` did.

    Attributes:
        plugin_dir: The installed plugin folder.
        python: The Python recorded to run geoseg.
        geoseg_version: The version of geoseg that Python imports.
        settings: The profile's QGIS3.ini.
        enabled: Whether the plugin was enabled in ``settings`` (False: an unreadable file, left alone).
        replaced: Whether an earlier install was replaced.
    """

    plugin_dir: Path
    python: str
    geoseg_version: str
    settings: Path
    enabled: bool
    replaced: bool


def qgis_settings_dir(*, environ: Mapping[str, str] | None = None, platform: str | None = None,
                      home: Path | None = None) -> Path:
    """QGIS's settings folder: ``$QGIS_CUSTOM_CONFIG_PATH``, else the platform's per-user folder."""
    env = os.environ if environ is None else environ
    if env.get(CONFIG_PATH_VARIABLE):
        return Path(env[CONFIG_PATH_VARIABLE])
    plat = sys.platform if platform is None else platform
    user = Path.home() if home is None else home
    if plat.startswith("win"):
        return Path(env["APPDATA"]) / "QGIS" / "QGIS3" if env.get("APPDATA") else (
            user / "AppData" / "Roaming" / "QGIS" / "QGIS3")
    if plat == "darwin":
        return user / "Library" / "Application Support" / "QGIS" / "QGIS3"
    data = Path(env["XDG_DATA_HOME"]) if env.get("XDG_DATA_HOME") else user / ".local" / "share"
    return data / "QGIS" / "QGIS3"


def profile_dir(profile: str = DEFAULT_PROFILE, *, environ: Mapping[str, str] | None = None) -> Path:
    """The folder of QGIS profile ``profile``, which QGIS created.

    Raises:
        OutputError: No QGIS settings folder, or no such profile in it.
    """
    base = qgis_settings_dir(environ=environ)
    if not profile or Path(profile).name != profile or profile in (".", ".."):
        raise ConfigError(f"--profile should be the name of a QGIS profile like 'default', got {profile!r}")
    if not base.is_dir():
        raise file_error(OutputError, base, "is not a QGIS settings folder (QGIS makes it when it first starts)",
                         f"start QGIS once, or set {CONFIG_PATH_VARIABLE} to the folder your QGIS uses")
    folder = base / "profiles" / profile
    if not folder.is_dir():
        profiles = base / "profiles"
        found = sorted(p.name for p in profiles.iterdir() if p.is_dir()) if profiles.is_dir() else []
        listed = f"profiles there: {', '.join(found)}" if found else "no profiles there yet"
        raise file_error(OutputError, folder, f"no QGIS profile {profile!r} ({listed})",
                         "pass --profile NAME of one of them, or start QGIS once with that profile "
                         "(Settings > User Profiles > New Profile)")
    return folder


def check_python(python: str | os.PathLike[str]) -> tuple[str, str]:
    """The absolute path of ``python`` and the geoseg version it imports.

    The path is kept as given (not resolved): a virtual environment's python is a
    link to the base interpreter, and only the link finds the environment.

    Raises:
        ConfigError: No such file, or it cannot import geoseg.
    """
    path = os.path.abspath(os.fspath(python))
    fix = "pass --python the python of the environment where geoseg is installed (e.g. .venv/bin/python)"
    if not os.path.isfile(path):
        raise file_error(ConfigError, path, "does not exist", fix)
    try:  # as the plugin will run it (its environment), from a neutral folder: a geoseg source tree in the
        # working folder must not count
        probe = subprocess.run([path, "-c", "import geoseg; print(geoseg.__version__)"], capture_output=True,
                               text=True, env=child_environment(), cwd=tempfile.gettempdir(),
                               timeout=PYTHON_CHECK_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise file_error(ConfigError, path, f"cannot be run ({exc})", fix) from None
    if probe.returncode != 0 or not probe.stdout.strip():
        last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        raise file_error(ConfigError, path, f"cannot import geoseg ({last})", fix)
    return path, probe.stdout.strip().splitlines()[-1]


def plugin_files() -> dict[str, bytes]:
    """The plugin's files by name: the shipped ones, metadata.txt with this geoseg's version, the rooftop style."""
    folder = resources.files("geoseg").joinpath(PLUGIN_PACKAGE)
    files = {}
    for item in sorted(folder.iterdir(), key=lambda i: i.name):
        if item.is_file() and item.name.endswith(SHIPPED_SUFFIXES):
            files[item.name] = item.read_bytes()
    metadata = files["metadata.txt"].decode("utf-8")
    files["metadata.txt"] = re.sub(r"(?m)^version=.*$", f"version={__version__}", metadata).encode("utf-8")
    files[STYLE_FILE] = default_style().encode("utf-8")  # the one style geoseg writes into its GeoPackages
    return files


def set_plugin_enabled(text: str, enabled: bool | None, *, name: str = PLUGIN_NAME) -> str:
    """``text`` of a QGIS3.ini with ``name=true|false`` in ``[PythonPlugins]`` (``enabled`` None: the key removed).

    Only that one line changes; every other line, its order and the line endings stay as
    they were (the file is QSettings' INI, which a generic INI writer would rewrite).
    """
    newline = "\r\n" if "\r\n" in text else "\n"
    lines = text.splitlines(keepends=True)
    entry = f"{name}={'true' if enabled else 'false'}{newline}"
    key = re.compile(rf"^\s*{re.escape(name)}\s*=")
    start = next((i for i, ln in enumerate(lines) if ln.strip() == f"[{PLUGINS_SECTION}]"), None)
    if start is None:
        if enabled is None:
            return text
        tail = "" if not text or text.endswith(("\n", "\r")) else newline
        gap = newline if text.strip() else ""
        return f"{text}{tail}{gap}[{PLUGINS_SECTION}]{newline}{entry}"
    end = next((i for i in range(start + 1, len(lines)) if lines[i].lstrip().startswith("[")), len(lines))
    found = [i for i in range(start + 1, end) if key.match(lines[i])]
    for i in reversed(found[1:]):
        del lines[i]
    if found:
        if enabled is None:
            del lines[found[0]]
        else:
            lines[found[0]] = entry
    elif enabled is not None:
        if not lines[start].endswith(("\n", "\r")):
            lines[start] += newline
        lines.insert(start + 1, entry)
    return "".join(lines)


def _writable(path: Path, *, fix: str) -> None:
    """Refuse ``path`` when it, or its nearest existing folder, cannot be written."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe == path and path.is_dir():
        problem = None if os.access(path, os.W_OK | os.X_OK) else f"folder {path} is not writable"
    elif probe == path:
        problem = None if os.access(path, os.W_OK) else f"file {path} is not writable"
    elif not probe.is_dir():
        problem = f"{probe} is a file, not a folder"
    else:
        problem = None if os.access(probe, os.W_OK | os.X_OK) else f"folder {probe} is not writable"
    if problem:
        raise file_error(OutputError, path, f"cannot be written ({problem})", fix)


def _read_settings(path: Path) -> str | None:
    """The text of a QGIS3.ini ('' when it does not exist yet), or None when it cannot be edited safely."""
    if not path.exists():
        return ""
    try:
        return path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _replace_file(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` in one step (a temporary beside it, then a rename), keeping its mode."""
    tmp = temporary_path(path)
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        if path.exists():
            shutil.copymode(path, tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def install_plugin(*, profile: str = DEFAULT_PROFILE, python: str | os.PathLike[str] | None = None) -> PluginInstall:
    """Copy the plugin into QGIS profile ``profile``, record ``python`` and enable the plugin.

    Args:
        profile: The QGIS profile (its folder must exist: QGIS creates it).
        python: The Python that runs geoseg for the plugin (default: this one).

    Raises:
        OutputError: No QGIS settings folder or profile; a folder or file that cannot be written.
        ConfigError: ``python`` does not exist or cannot import geoseg.
    """
    folder = profile_dir(profile)
    plugins = folder / "python" / "plugins"
    target = plugins / PLUGIN_NAME
    settings = folder / SETTINGS_FILE
    fix = "check its permissions, or pass another --profile"
    _writable(plugins, fix=fix)
    _writable(settings, fix=fix)
    if target.exists() and not target.is_dir():
        raise file_error(OutputError, target, "is a file, not a plugin folder", "remove it and install again")
    path, version = check_python(sys.executable if python is None else python)
    files = plugin_files()
    files[ENVIRONMENT_FILE] = (json.dumps({"python": path, "geoseg_version": version}, indent=1) + "\n").encode()
    old_settings = _read_settings(settings)
    created = [p for p in (folder / "python", plugins, settings.parent) if not p.exists()]
    replaced = target.exists()
    stage = aside = None
    moved = False
    try:
        for p in created:
            p.mkdir()
        stage = make_temporary_folder(plugins, PLUGIN_NAME, output=target)
        new = stage / PLUGIN_NAME
        new.mkdir()
        for name, data in files.items():
            (new / name).write_bytes(data)
        if replaced:
            aside = temporary_path(target)
            os.rename(target, aside)
        os.rename(new, target)
        moved = True
        if old_settings is not None:
            _replace_file(settings, set_plugin_enabled(old_settings, True))
    except BaseException as exc:
        if moved:
            shutil.rmtree(target, ignore_errors=True)
        if aside is not None and aside.exists():
            os.rename(aside, target)
        for p in reversed(created):
            with contextlib.suppress(OSError):
                p.rmdir()
        if isinstance(exc, OSError):
            raise file_error(OutputError, target, f"cannot be written ({exc.strerror or exc})", fix) from None
        raise
    finally:
        if stage is not None:
            remove_temporary(stage)
    if aside is not None:
        remove_temporary(aside)
    return PluginInstall(plugin_dir=target, python=path, geoseg_version=version, settings=settings,
                         enabled=old_settings is not None, replaced=replaced)


def uninstall_plugin(*, profile: str = DEFAULT_PROFILE) -> Path:
    """Remove the plugin from QGIS profile ``profile`` (and its line in the profile's QGIS3.ini).

    Returns:
        The removed plugin folder.

    Raises:
        OutputError: No such profile, no plugin installed there, or it cannot be removed.
    """
    folder = profile_dir(profile)
    target = folder / "python" / "plugins" / PLUGIN_NAME
    settings = folder / SETTINGS_FILE
    if not target.is_dir():
        raise file_error(OutputError, target, f"geoseg's plugin is not installed in QGIS profile {profile!r}",
                         "pass --profile NAME of the profile it was installed in")
    fix = "check its permissions (and close QGIS if it holds the files)"
    _writable(target.parent, fix=fix)
    old_settings = _read_settings(settings) if settings.exists() else None
    aside = temporary_path(target)
    try:
        os.rename(target, aside)  # one step: the plugin is gone whole or still there whole
    except OSError as exc:
        raise file_error(OutputError, target, f"cannot be removed ({exc.strerror or exc})", fix) from None
    try:
        if old_settings:
            _replace_file(settings, set_plugin_enabled(old_settings, None))
    except OSError as exc:
        os.rename(aside, target)
        raise file_error(OutputError, settings, f"cannot be written ({exc.strerror or exc})", fix) from None
    remove_temporary(aside)
    return target


def package_plugin(out: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Zip the plugin for QGIS's plugin manager (Install from ZIP): ``geoseg/`` and its files.

    The zip records no Python environment: the plugin then runs ``$GEOSEG_PYTHON -m geoseg``
    or the ``geoseg`` found on PATH, or ``geoseg qgis install`` records one later.

    Raises:
        OutputError: ``out`` is not a .zip, exists without ``overwrite``, or cannot be written.
    """
    p = Path(out)
    if p.suffix.lower() != ".zip":
        raise file_error(OutputError, p, "should end in .zip", "QGIS's plugin manager installs zip files: "
                         "pass --out geoseg.zip")
    with atomic_output(p, overwrite=overwrite) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for name, data in plugin_files().items():
                zf.writestr(f"{PLUGIN_NAME}/{name}", data)
    return p
