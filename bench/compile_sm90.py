"""Compile every fused-BN Triton kernel for sm_90 (Hopper) without a GPU, and report resources.

    python bench/compile_sm90.py [--quick]

Triton compiles to cubin through its bundled ``ptxas`` with no device present, so this checks on
any x86-64 machine that the kernels lower for the H200 with the installed Triton, and shows
registers / spills (``cuobjdump --dump-resource-usage``) and whether the dense kernels use 128-bit
global loads (``LDG.E.128`` in SASS). Exit status 1 if a kernel fails to compile or spills.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Any

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from bnrewrite.kernels import triton_kernels as tk  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
_FLOATS = {"eps", "inv_n", "momentum", "unbias"}
DIV16 = {"C", "L"}


def _signature(fn: Any, dtype: str) -> dict[str, str]:
    sig = {}
    for p in fn.params:
        n = p.name
        if p.is_constexpr:
            sig[n] = "constexpr"
        elif n in ("x_ptr", "y_ptr", "dy_ptr", "dx_ptr"):
            sig[n] = f"*{dtype}"
        elif n == "off_ptr":
            sig[n] = "*i64"
        elif n.endswith("_ptr"):
            sig[n] = "*fp32"
        elif n in _FLOATS:
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
    return sig


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_one(fn: Any, dtype: str, constexprs: dict[str, Any], num_warps: int) -> dict[str, Any]:
    sig = _signature(fn, dtype)
    # what Triton's launcher specialises at run time: 16-byte aligned pointers and integers that
    # are multiples of 16 (C and L for ResNet-50's shapes at batch 256)
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, p in enumerate(fn.params)
        if not p.is_constexpr and (p.name.endswith("_ptr") or p.name in DIV16)
    }
    t0 = time.perf_counter()
    k = triton.compile(
        ASTSource(fn, sig, constexprs, attrs), target=TARGET, options={"num_warps": num_warps}
    )
    res: dict[str, Any] = {"kernel": fn.__name__, "dtype": dtype, "s": time.perf_counter() - t0}
    res.update(
        {
            k_: v
            for k_, v in constexprs.items()
            if k_ in ("CL", "UNIFORM", "RELU", "HAS_Z", "BLOCK_L", "BLOCK_C", "BLOCK_S")
        }
    )
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        usage = subprocess.run(
            [_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True, text=True
        ).stdout
        sass = subprocess.run(
            [_tool("cuobjdump"), "--dump-sass", f.name], capture_output=True, text=True
        ).stdout
    m = re.search(r"REG:(\d+)", usage)
    res["regs"] = int(m.group(1)) if m else None
    m = re.search(r"STACK:(\d+)", usage)
    res["stack"] = int(m.group(1)) if m else None
    res["ldg128"] = sass.count("LDG.E.128")
    res["ldg"] = len(re.findall(r"LDG\.E", sass))
    res["stg128"] = sass.count("STG.E.128")
    return res


def configs(quick: bool) -> list[tuple[Any, str, dict[str, Any], int]]:
    out = []
    dtypes = ["bf16"] if quick else ["bf16", "fp16", "fp32"]
    for dt in dtypes:
        for cl in (True, False) if not quick else (True,):
            bl, bc = (32, 128) if cl else (256, 16)
            nw = 8
            for relu, has_z in ((False, False), (True, False), (True, True)):
                # with a residual the backward uses half-size tiles (bnrewrite.kernels.ops)
                zbl = bl // 2 if has_z else bl
                dense = dict(CL=cl, HAS_B=True, HAS_Z=has_z, RELU=relu, BLOCK_L=zbl, BLOCK_C=bc)
                out.append((tk.normalize_kernel, dt, dense, nw))
                out.append((tk.bwd_main_kernel, dt, dict(dense, HAS_W=True), nw))
            for offs, uniform in (
                ((0, -1, -1, -1), True),  # BS, one group per block
                ((-1, 0, 1, -1), True),  # FS 2-D, one group per block
                ((-1, 0, 1, -1), False),  # FS 2-D, groups straddling blocks
            ):
                sbc = (16 if uniform else 64) if cl else 16
                ce = dict(OFF_R=offs[0], OFF_0=offs[1], OFF_1=offs[2], OFF_2=offs[3], CL=cl)
                ce["UNIFORM"] = uniform
                out.append(
                    (tk.sample_stats_kernel, dt, dict(ce, BLOCK_S=2048 // sbc, BLOCK_C=sbc), 4)
                )
                out.append(
                    (
                        tk.bwd_fixup_kernel,
                        dt,
                        dict(
                            ce,
                            HAS_W=True,
                            HAS_B=True,
                            HAS_Z=uniform,
                            RELU=uniform,
                            BLOCK_S=2048 // sbc,
                            BLOCK_C=sbc,
                        ),
                        4,
                    )
                )
    fin = dict(HAS_W=True, HAS_RUNNING=True, MOM_TENSOR=False, BLOCK_P=64, BLOCK_C=64)
    out.append((tk.finalize_stats_kernel, "fp32", fin, 4))
    out.append((tk.reduce_partials_kernel, "fp32", dict(BLOCK_P=64, BLOCK_C=64), 4))
    return out


def main(argv: list[str]) -> int:
    quick = "--quick" in argv
    bad = 0
    print(f"triton {triton.__version__}, target sm_90")
    for fn, dt, ce, nw in configs(quick):
        try:
            r = compile_one(fn, dt, ce, nw)
        except Exception as e:  # noqa: BLE001
            bad += 1
            print(f"FAIL {fn.__name__} {dt} {ce}: {type(e).__name__}: {str(e)[:500]}")
            continue
        spill = (r["stack"] or 0) > 0
        bad += spill
        print(
            f"{'SPILL' if spill else 'ok   '} {r['kernel']:<24} {dt:<5} "
            f"{ {k: v for k, v in r.items() if k in ('CL', 'UNIFORM', 'RELU', 'HAS_Z', 'BLOCK_L', 'BLOCK_C', 'BLOCK_S')} } "
            f"regs {r['regs']} stack {r['stack']} LDG {r['ldg']} (128-bit {r['ldg128']}) "
            f"STG.128 {r['stg128']} [{r['s']:.1f} s]",
            flush=True,
        )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
