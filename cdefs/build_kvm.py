"""Build kvmmem's cffi extension, ``kvmmem._kvm_cffi``, in out-of-line API mode.

The declarations live in ``kvm_cdef.h``; the C compiler fills in every
ioctl number, constant and struct layout from ``<linux/kvm.h>`` and
``kvm_compat.h``. Used by setuptools (``cffi_modules``) and, run as a script,
to build the extension in place next to the package.
"""

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent

ffibuilder = FFI()
ffibuilder.cdef((HERE / "kvm_cdef.h").read_text())
ffibuilder.set_source(
    "kvmmem._kvm_cffi",
    r"""
    #include <errno.h>
    #include <stdint.h>
    #include <sys/ioctl.h>
    #include <sys/mman.h>
    #include "kvm_compat.h"

    static int kvmmem_ioctl_ptr(int fd, unsigned long request, void *arg)
    {
        return ioctl(fd, request, arg);
    }

    static int kvmmem_ioctl_int(int fd, unsigned long request, unsigned long arg)
    {
        return ioctl(fd, request, arg);
    }

    /* 0 when every page of [addr, addr+size) is mapped; else -1 with errno
       ENOMEM.  msync(MS_ASYNC) only walks the VMAs, it writes nothing back. */
    static int kvmmem_range_mapped(uint64_t addr, uint64_t size)
    {
        return msync((void *)(uintptr_t)addr, (size_t)size, MS_ASYNC);
    }

    static void *kvmmem_run_exit_data(struct kvm_run *run)
    {
        return &run->hw;
    }
    """,
    include_dirs=[str(HERE)],
    extra_compile_args=["-std=gnu11", "-Wall", "-Werror=implicit-function-declaration"],
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=str(HERE.parent / "build" / "cffi"), verbose=False)
    # compile() writes the module under tmpdir/kvmmem/; move it next to the package.
    import shutil

    built = HERE.parent / "build" / "cffi" / "kvmmem"
    for stale in (HERE.parent / "kvmmem").glob("_kvm_cffi*.so"):
        stale.unlink()
    for so in built.glob("_kvm_cffi*.so"):
        shutil.copy2(so, HERE.parent / "kvmmem" / so.name)
        print(f"built kvmmem/{so.name}")
