"""Instructions per KV tile of the attention kernel, compiled for the H100 (sm_90) on any machine.

    python benchmarks/sass_loops.py                # prefill launch, beside the dense reference kernel
    python benchmarks/sass_loops.py --context      # prefill of a new turn over cached context
    python benchmarks/sass_loops.py --decode       # a decode launch (64 splits)

Triton ships ptxas and cuobjdump, so a kernel compiles to SASS without a GPU. Each loop of the
SASS (a backward branch) is one KV-tile loop of the source; its instruction mix says what a tile
costs beside the matrix products, so an addressing change can be judged before any device time
(per-tile 64-bit row multiplies make the prefill loop 11% longer than the dense kernel's;
tests/kernels/test_sass.py keeps it within 5%).
Also prints registers, stack (spills) and shared memory per program. Run it without
TRITON_INTERPRET: under the interpreter Triton's kernels are not compilable objects.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

H100 = GPUTarget("cuda", 90, 32)
COLUMNS = ["HGMMA", "HMMA", "MUFU", "FFMA", "FMUL", "FADD", "FMNMX", "IMAD", "IADD3", "LEA", "ISETP", "FSEL", "LDGSTS", "LDG"]
_TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def compile_sass(fn, signature: dict[str, str], constexprs: dict, aligned: tuple[str, ...], **options):
    """SASS text and resource use of fn for sm_90; `aligned` args are marked divisible by 16, as
    Triton specialises them at launch."""
    sig = dict(signature, **{name: "constexpr" for name in constexprs})
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    kernel = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=H100, options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        sass = subprocess.run([_TOOLS / "cuobjdump", "-sass", f.name], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([_TOOLS / "cuobjdump", "-res-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    m = re.search(r"REG:(\d+).*?STACK:(\d+)", usage, re.S)
    return sass, dict(registers=int(m[1]), stack_bytes=int(m[2]), shared_bytes=kernel.metadata.shared)


def loops(sass: str) -> list[tuple[int, collections.Counter]]:
    """(instruction count, opcode counts) of each loop body: the span a backward branch closes."""
    ins = [(int(a, 16), text) for a, text in re.findall(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", sass)]
    index = {addr: i for i, (addr, _) in enumerate(ins)}
    found = []
    for i, (addr, text) in enumerate(ins):
        m = re.search(r"BRA\s+(0x[0-9a-f]+)", text)
        if m and int(m[1], 16) < addr:
            body = [t for _, t in ins[index[int(m[1], 16)]:i + 1]]
            ops = collections.Counter(re.match(r"(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", t)[1] for t in body)
            found.append((len(body), ops))
    return [f for f in found if f[1]["HGMMA"] or f[1]["HMMA"]]       # the KV-tile loops


def paged_sass(decode: bool, block_n: int, warps: int, stages: int, maxnreg: int | None, context: bool = False):
    from pensieve.kernels import attention

    pointers = ["out", "q", "kv_cache", "block_tables", "positions", "query_start_loc", "seq_lens", "part_acc",
                "part_ml", "k_new", "v_new"]
    strides = ["stride_qt", "stride_qh", "stride_ot", "stride_oh", "stride_cb", "stride_ckv", "stride_cs", "stride_ch",
               "stride_bt", "stride_knt", "stride_knh", "stride_vnt", "stride_vnh"]
    types = dict(block_tables="*i32", positions="*i64", query_start_loc="*i32", seq_lens="*i32",
                 part_acc="*fp32" if decode else "*bf16", part_ml="*fp32" if decode else "*bf16")
    signature = {p: types.get(p, "*bf16") for p in pointers} | dict(qk_scale="fp32", num_seqs="i32")
    signature |= {s: "i32" for s in strides}
    splits = 64 if decode else 1
    constexprs = dict(NEW_KV=not decode, CTX=decode or context, GROUP=4, GROUP_PAD=4, BLOCK_Q=1 if decode else 32,
                      BLOCK_M=16 if decode else 128, BLOCK_N=block_n, BLOCK_SIZE=16, HEAD_DIM=128, D_PAD=128,
                      NUM_SPLITS=splits, DECODE=decode, PRECISION="tf32", K_ND=not decode,
                      PDL_WAIT=decode, PDL_TRIGGER=decode)
    options = dict(num_warps=warps, num_stages=stages, **({"maxnreg": maxnreg} if maxnreg else {}))
    aligned = tuple(pointers) + tuple(s for s in strides if s != "stride_bt")
    return compile_sass(attention._paged_attention_kernel, signature, constexprs, aligned, **options)


def dense_sass(block_n: int, warps: int, stages: int, maxnreg: int | None):
    from prefill_probe import _dense_causal_kernel

    signature = dict(q="*bf16", k="*bf16", v="*bf16", out="*bf16", qk_scale="fp32", n_ctx="i32", stride_h="i32",
                     stride_t="i32")
    options = dict(num_warps=warps, num_stages=stages, **({"maxnreg": maxnreg} if maxnreg else {}))
    return compile_sass(_dense_causal_kernel, signature, dict(BLOCK_M=128, BLOCK_N=block_n, HEAD_DIM=128),
                        tuple(signature), **options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decode", action="store_true")
    parser.add_argument("--block-n", type=int)
    parser.add_argument("--warps", type=int)
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--maxnreg", type=int)
    parser.add_argument("--context", action="store_true", help="prefill over cached context (the paged loops too)")
    parser.add_argument("--json", action="store_true", help="print {kernel: {loops, usage}} as JSON instead")
    args = parser.parse_args()
    if args.decode:
        block_n, warps, maxnreg = args.block_n or 32, args.warps or 4, args.maxnreg
        kernels = {"paged decode": paged_sass(True, block_n, warps, args.stages, maxnreg)}
    else:
        block_n, warps = args.block_n or 64, args.warps or 8
        maxnreg = 128 if args.maxnreg is None else (args.maxnreg or None)   # --maxnreg 0: no cap
        kernels = {"paged prefill": paged_sass(False, block_n, warps, args.stages, maxnreg, args.context),
                   "dense reference": dense_sass(block_n, warps, args.stages, maxnreg)}
    if args.json:
        print(json.dumps({name: {"loops": [[n, dict(ops)] for n, ops in loops(sass)], "usage": usage}
                          for name, (sass, usage) in kernels.items()}))
        return
    print("| kernel | loop | instructions | " + " | ".join(COLUMNS) + " |")
    print("|---|---|---|" + "---|" * len(COLUMNS))
    for name, (sass, usage) in kernels.items():
        for i, (n, ops) in enumerate(loops(sass)):
            print(f"| {name} | {i} | {n} | " + " | ".join(str(ops[c]) for c in COLUMNS) + " |")
    for name, (_, usage) in kernels.items():
        print(f"{name}: {usage}")


if __name__ == "__main__":
    main()
