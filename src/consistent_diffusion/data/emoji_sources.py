"""Where the emoji dataset's artwork comes from: extracted npm package folders (``--from DIR``) or
the npm client (``npm pack`` into a cache), one source description per style a package draws.

``DEFAULT_STYLES`` is what a build fetches when no style is named (``data emoji`` and
``metrics validate`` without ``--data`` alike): every style of ``data.styles.STYLES``, two of them
held out (``HELDOUT_STYLES``) so the unseen-style protocols have rows.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path

from consistent_diffusion.core.errors import ConfigError, ConsistentDiffusionError
from consistent_diffusion.data.styles import ALL_STYLES, DATASOURCE_PREFIX, spec_of, styles_of_package

DEFAULT_STYLES = ALL_STYLES  # the styles a build fetches by default: all seven
DEFAULT_NPM_VERSION = "16.0.0"  # emoji-datasource version; the other packages' versions are in STYLES


def package_slug(package: str) -> str:
    """npm's tarball stem of a package: '@lobehub/fluent-emoji-3d' -> 'lobehub-fluent-emoji-3d'."""
    return package.lstrip("@").replace("/", "-")


def npm_pack(package: str, version: str, cache: Path) -> Path:
    """Fetch ``package@version`` with the npm client into ``cache``; return the extracted folder.

    The folder returned is the package root (holding ``package.json``). Reuses earlier downloads.
    """
    slug = package_slug(package)
    target = cache / f"{slug}-{version}"
    if (target / "package" / "package.json").is_file():
        return target / "package"
    if shutil.which("npm") is None:
        raise ConsistentDiffusionError(
            "npm is not installed, so the emoji packages cannot be fetched. Either install Node.js/npm, "
            f"or fetch and extract them elsewhere (npm pack {package}@{version}; tar xzf the .tgz) and "
            "pass the extracted 'package' folders with --from DIR (once per package)."
        )
    cache.mkdir(parents=True, exist_ok=True)
    tarball = cache / f"{slug}-{version}.tgz"
    if not tarball.is_file():
        result = subprocess.run(
            ["npm", "pack", f"{package}@{version}", "--pack-destination", str(cache)],
            capture_output=True, text=True, check=False,
        )
        if result.returncode != 0 or not tarball.is_file():
            raise ConsistentDiffusionError(
                f"npm pack {package}@{version} failed: {result.stderr.strip()[-400:]}; "
                "fetch it elsewhere and pass the extracted folder with --from DIR"
            )
    temp = Path(tempfile.mkdtemp(prefix=".extract-", dir=cache))
    try:
        with tarfile.open(tarball, "r:gz") as archive:
            archive.extractall(temp, filter="data")
        os.replace(temp, target)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return target / "package"


def describe_sources(folder: Path) -> list[dict]:
    """One source description per style an extracted package folder draws."""
    root, info, specs = styles_of_package(Path(folder))
    version = str(info.get("version", "?"))
    return [{"root": root, "style": s.style, "vendor": s.style, "package": str(info.get("name")),
             "version": version, "folder": s.folder} for s in specs]


def describe_source(folder: Path) -> dict:
    """Vendor, package name and version of an extracted ``emoji-datasource-<vendor>`` folder."""
    sources = describe_sources(folder)
    if not sources[0]["package"].startswith(DATASOURCE_PREFIX):
        raise ConsistentDiffusionError(f"{folder} is not an emoji-datasource-<vendor> package")
    return sources[0]


def resolve_sources(sources: Sequence[str | Path], styles: Sequence[str] | None, cache: str | Path | None,
                    npm_version: str) -> list[dict]:
    """Source descriptions (one per style, in the order asked), from ``--from`` folders (``sources``)
    or npm packs of ``styles`` (default ``DEFAULT_STYLES``; the emoji-datasource packages at
    ``npm_version``) cached under ``cache``: ``EmojiDatasetConfig``'s fields of the same names."""
    if sources:
        found = [s for folder in sources for s in describe_sources(folder)]
    else:
        cache = Path(cache or Path.home() / ".cache" / "consistent-diffusion" / "npm")
        packages: dict[str, str] = {}
        for style in styles or DEFAULT_STYLES:
            spec = spec_of(style)
            version = npm_version if spec.package.startswith(DATASOURCE_PREFIX) else spec.version
            packages.setdefault(spec.package, version)
        found = [s for p, v in packages.items() for s in describe_sources(npm_pack(p, v, cache))]
    drawn = [s["style"] for s in found]
    if len(set(drawn)) != len(drawn):
        raise ConfigError(f"each style may be given once, got {drawn}")
    if styles is None:
        return found
    missing = [s for s in styles if s not in drawn]
    if missing:
        raise ConfigError(f"no source draws the style(s) {missing}; sources draw {drawn}")
    by_style = {s["style"]: s for s in found}
    return [by_style[s] for s in styles]
