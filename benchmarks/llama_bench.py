"""llama.cpp's `llama-bench` as a baseline column: found, or built once from source, then run.

The source is llama.cpp as vendored in the `llama-cpp-python` sdist on the package index (pip
downloads it; nothing else is fetched). It is built CPU-only with cmake + ninja, static, native
ISA, only the `llama-bench` target (~7-15 minutes on 2 shared cores), and the binary is cached at
`<memlm cache>/llama.cpp/<version>/llama-bench`. `$MEMLM_LLAMA_BENCH` names a binary to use instead.

    .venv/bin/python benchmarks/llama_bench.py            # build (or find) and print the binary's path
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from memlm.models.loading import default_cache_dir

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
CMAKE_OPTIONS = [
    "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_CURL=OFF",
]


def cached_binary(version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    return default_cache_dir() / "llama.cpp" / version / "llama-bench"


def find_llama_bench(build: bool = True, version: str = LLAMA_CPP_PYTHON_VERSION) -> tuple[Path | None, str]:
    """(path of a llama-bench binary, how it was found) or (None, why there is none)."""
    if env := os.environ.get("MEMLM_LLAMA_BENCH"):
        path = Path(env)
        return (path, "$MEMLM_LLAMA_BENCH") if path.is_file() else (None, f"$MEMLM_LLAMA_BENCH={env} is not a file")
    cached = cached_binary(version)
    if cached.is_file():
        return cached, f"cached build of llama-cpp-python {version}'s llama.cpp"
    if not build:
        return None, f"no llama-bench at {cached} (run benchmarks/llama_bench.py to build it)"
    missing = [tool for tool in ("cmake", "ninja", "c++") if shutil.which(tool) is None]
    if missing:
        return None, f"cannot build llama.cpp: {', '.join(missing)} not found (pip install cmake ninja; a C++ compiler)"
    try:
        build_llama_bench(cached, version)
    except (OSError, subprocess.CalledProcessError, tarfile.TarError) as e:
        return None, f"building llama.cpp failed: {e}"
    return cached, f"built llama-cpp-python {version}'s llama.cpp"


def build_llama_bench(target: Path, version: str = LLAMA_CPP_PYTHON_VERSION) -> None:
    """Download the sdist, build `llama-bench`, copy it to `target` (atomically, by rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".build-", dir=target.parent) as tmp:
        work = Path(tmp)
        print(f"building llama-bench from llama-cpp-python {version} (minutes) in {work}", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={version}", "-d", str(work)], check=True, stdout=subprocess.DEVNULL)
        sdist = next(work.glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            tar.extractall(work, filter="data")
        source = next(work.glob("llama_cpp_python-*/vendor/llama.cpp"))
        build = work / "build"
        log = open(work / "build.log", "w")
        try:
            subprocess.run(["cmake", "-S", str(source), "-B", str(build), "-G", "Ninja", *CMAKE_OPTIONS],
                           check=True, stdout=log, stderr=subprocess.STDOUT)
            subprocess.run(["cmake", "--build", str(build), "--target", "llama-bench", "-j", str(os.cpu_count() or 2)],
                           check=True, stdout=log, stderr=subprocess.STDOUT)
        except subprocess.CalledProcessError:
            log.close()
            print((work / "build.log").read_text()[-3000:], file=sys.stderr)
            raise
        log.close()
        shutil.copy2(build / "bin" / "llama-bench", work / "llama-bench")
        os.replace(work / "llama-bench", target)


def run_llama_bench(binary: Path, gguf: Path, threads: int, prompt_tokens: int, new_tokens: int,
                    repetitions: int = 1) -> dict[str, float]:
    """{"prefill": tokens/s of a prompt_tokens prompt, "decode": tokens/s generating new_tokens}
    (llama-bench's pp and tg tests; tg decodes from an empty context)."""
    out = subprocess.run([str(binary), "-m", str(gguf), "-t", str(threads), "-p", str(prompt_tokens),
                          "-n", str(new_tokens), "-r", str(repetitions), "-o", "json"],
                         check=True, capture_output=True, text=True).stdout
    rates: dict[str, float] = {}
    for test in json.loads(out):
        phase = "decode" if test["n_gen"] else "prefill"
        rates[phase] = float(test["avg_ts"])
    if set(rates) != {"prefill", "decode"}:
        raise ValueError(f"llama-bench printed no pp/tg results: {out[:500]}")
    return rates


if __name__ == "__main__":
    path, how = find_llama_bench()
    print(path or "-", how)
    sys.exit(0 if path else 1)
