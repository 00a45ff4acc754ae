"""Compile CUDA C sources to PTX without a GPU: NVRTC through ctypes, or `nvcc --ptx`.

The CUDA kernels are compiled at run time by NVRTC (through cupy.RawModule), so a typo in a source
string would only show on a GPU. NVRTC and nvcc compile to PTX on any machine; this helper lets a
test compile every source for both element types where either is installed:

    compiler = find_compiler()            # None when neither libnvrtc nor nvcc is found
    compiler.compile(source, options)     # -> PTX text; CompileError with the log otherwise

libnvrtc is looked for in the nvidia-cuda-nvrtc wheel (nvidia/*/lib), $CUDA_PATH/lib64 and
/usr/local/cuda/lib64, then by the loader's own search; nvcc on PATH. Headers (cuda_fp16.h and, for
the noise kernel, curand_kernel.h) come from npdiff.kernels.cuda.runtime.cuda_include_dirs().
"""

import ctypes
import glob
import os
import shutil
import subprocess
import tempfile

ARCH = "compute_75"  # the oldest architecture CUDA 13 still compiles for


class CompileError(RuntimeError):
    pass


def _nvrtc_candidates():
    roots = []
    try:
        import nvidia  # the namespace package of NVIDIA's pip wheels

        roots += [os.path.join(path, "*", "lib", "libnvrtc.so*") for path in nvidia.__path__]
    except ImportError:
        pass
    for base in (os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if base:
            roots += [os.path.join(base, "lib64", "libnvrtc.so*"), os.path.join(base, "lib", "libnvrtc.so*")]
    found = [path for pattern in roots for path in sorted(glob.glob(pattern)) if "alt" not in os.path.basename(path)]
    return found + ["libnvrtc.so", "libnvrtc.so.13", "libnvrtc.so.12"]


class Nvrtc:
    """NVRTC's C API: create a program, compile it with options, read the log and the PTX."""

    def __init__(self, library):
        self.library = library
        # NVRTC opens libnvrtc-builtins at compile time; load the one beside it first (a wheel's
        # lib folder is not on the loader's path)
        for builtins in sorted(glob.glob(os.path.join(os.path.dirname(library), "libnvrtc-builtins.so*"))):
            if "alt" not in os.path.basename(builtins):
                ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
        self.lib = ctypes.CDLL(library)
        self.name = f"NVRTC ({library})"

    def _check(self, status, what, program=None):
        if status != 0:
            log = self._log(program) if program is not None else ""
            raise CompileError(f"{what} failed with NVRTC status {status}\n{log}")

    def _log(self, program):
        size = ctypes.c_size_t()
        self.lib.nvrtcGetProgramLogSize(program, ctypes.byref(size))
        buffer = ctypes.create_string_buffer(size.value)
        self.lib.nvrtcGetProgramLog(program, buffer)
        return buffer.value.decode(errors="replace")

    def compile(self, source, options=()):
        program = ctypes.c_void_p()
        self._check(self.lib.nvrtcCreateProgram(ctypes.byref(program), source.encode(), b"kernel.cu", 0, None, None),
                    "nvrtcCreateProgram")
        try:
            arguments = [f"--gpu-architecture={ARCH}", *options]
            array = (ctypes.c_char_p * len(arguments))(*[a.encode() for a in arguments])
            self._check(self.lib.nvrtcCompileProgram(program, len(arguments), array), "nvrtcCompileProgram", program)
            size = ctypes.c_size_t()
            self._check(self.lib.nvrtcGetPTXSize(program, ctypes.byref(size)), "nvrtcGetPTXSize")
            buffer = ctypes.create_string_buffer(size.value)
            self._check(self.lib.nvrtcGetPTX(program, buffer), "nvrtcGetPTX")
            return buffer.value.decode()
        finally:
            self.lib.nvrtcDestroyProgram(ctypes.byref(program))


class Nvcc:
    """`nvcc --ptx` on a temporary file (device code only, as NVRTC compiles it)."""

    def __init__(self, path):
        self.path = path
        self.name = f"nvcc ({path})"

    def compile(self, source, options=()):
        with tempfile.TemporaryDirectory() as folder:
            source_path = os.path.join(folder, "kernel.cu")
            ptx_path = os.path.join(folder, "kernel.ptx")
            with open(source_path, "w") as f:
                f.write(source)
            command = [self.path, "--ptx", f"-arch={ARCH}", *options, source_path, "-o", ptx_path]
            result = subprocess.run(command, capture_output=True, text=True, timeout=300)
            if result.returncode != 0:
                raise CompileError(f"{' '.join(command)} failed:\n{result.stdout}{result.stderr}")
            with open(ptx_path) as f:
                return f.read()


def find_compiler():
    """NVRTC if a libnvrtc loads (what cupy uses), else nvcc on PATH, else None."""
    for library in _nvrtc_candidates():
        try:
            return Nvrtc(library)
        except OSError:
            continue
    nvcc = shutil.which("nvcc")
    return Nvcc(nvcc) if nvcc else None
