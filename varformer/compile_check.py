"""Ahead-of-time GPU compile check of every Triton kernel, without a GPU.

The Triton interpreter accepts kernels that a GPU compiler rejects (dot tiles under 16, shared
memory over the limit, register spills). This compiles every launch variant that the launchers in
``varformer.kernels`` can produce for sm_90a (H100/H200) and sm_80 (A100) with the ptxas shipped in
the triton wheel, and reports shared memory, registers and spills per kernel and configuration.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

# Dynamic shared memory a block may use (bytes): H100/H200 227 KB, A100 163 KB.
SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}


DTYPES = ("fp32", "fp16", "bf16")


def inventory(dtypes=DTYPES):
    """All launch variants of all kernel families for these input dtypes (fp32 also with TF32):
    list of dicts (see each kernel file's compile_inventory)."""
    from varformer.kernels import mediator_attention, vq_lookup, window_attention
    return [e for mod in (mediator_attention, window_attention, vq_lookup)
            for e in mod.compile_inventory(tuple(dtypes))]


def _ptxas_info(ptx: str, arch: int) -> dict:
    from triton.backends.nvidia.compiler import get_ptxas
    tool = get_ptxas(arch)
    exe = getattr(tool, "path", tool)
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([exe, "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(d, "k.o")],
                             capture_output=True, text=True)
    text = res.stderr + res.stdout
    info = {"registers": None, "spill_stores": None, "spill_loads": None, "stack": None,
            "ptxas_warnings": [ln.strip() for ln in text.splitlines() if "warning" in ln.lower()]}
    m = re.search(r"Used (\d+) registers", text)
    if m:
        info["registers"] = int(m.group(1))
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if m:
        info["stack"], info["spill_stores"], info["spill_loads"] = map(int, m.groups())
    if res.returncode:
        info["ptxas_error"] = text.strip()[-500:]
    return info


def compile_one(entry: dict, arch: int, ptxas: bool = True) -> dict:
    """Compile one inventory entry for ``sm_<arch>``; never raises (errors are in the row)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = {"kernel": entry["name"], "config": entry["label"], "arch": f"sm_{arch}",
           "num_warps": entry["num_warps"],
           "blocks": " ".join(f"{k}={v}" for k, v in entry["constexprs"].items()
                              if k.startswith("BLOCK")),
           "ok": False, "error": "", "shared": None}
    try:
        src = ASTSource(fn=entry["fn"], signature=entry["signature"],
                        constexprs=entry["constexprs"])
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": entry["num_warps"],
                                    "num_stages": entry.get("num_stages") or 3})
    except Exception as exc:  # a compile error is a finding, not a crash of the check
        row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}"
        return row
    row["shared"] = int(k.metadata.shared)
    if row["shared"] > SMEM_LIMIT[arch]:
        row["error"] = f"shared memory {row['shared']} B over the sm_{arch} limit {SMEM_LIMIT[arch]} B"
    if ptxas:
        info = _ptxas_info(k.asm["ptx"], arch)
        row.update({k_: v for k_, v in info.items() if k_ != "ptxas_error"})
        if "ptxas_error" in info:
            row["error"] = row["error"] or info["ptxas_error"]
    row["ok"] = not row["error"]
    return row


def run(archs=(90, 80), ptxas: bool = True, dtypes=DTYPES) -> list[dict]:
    """Compile every variant for every arch. Under TRITON_INTERPRET=1 (where @triton.jit gives
    interpreter functions that cannot be compiled) this runs in a child process without it."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        cmd = [sys.executable, "-m", "varformer.compile_check", "--json",
               "--archs", ",".join(map(str, archs)), "--dtypes", ",".join(dtypes)]
        cmd += [] if ptxas else ["--no-ptxas"]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if res.returncode:
            raise RuntimeError(f"compile check child failed:\n{res.stderr[-3000:]}")
        return json.loads(res.stdout)
    return [compile_one(e, a, ptxas) for a in archs for e in inventory(dtypes)]


def report(rows: list[dict]) -> str:
    """Markdown table: kernel, config, arch, warps, shared KB, registers, spills, status."""
    head = ("| kernel | config | blocks | arch | warps | smem KB | regs | spill st/ld B | status |\n"
            "|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        smem = "-" if r["shared"] is None else f"{r['shared'] / 1024:.1f}"
        spills = ("-" if r.get("spill_stores") is None
                  else f"{r['spill_stores']}/{r['spill_loads']}")
        status = "ok" if r["ok"] else f"FAIL {r['error']}"
        if r["ok"] and r.get("spill_stores"):
            status = "ok (spills)"
        lines.append(f"| {r['kernel']} | {r['config']} | {r['blocks']} | {r['arch']} | "
                     f"{r['num_warps']} | {smem} | {r.get('registers') or '-'} | {spills} | {status} |")
    n_fail = sum(not r["ok"] for r in rows)
    n_spill = sum(bool(r.get("spill_stores")) for r in rows)
    lines.append(f"\n{len(rows)} variants, {n_fail} failed, {n_spill} with register spills.")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default="90,80")
    ap.add_argument("--json", action="store_true", help="print rows as JSON")
    ap.add_argument("--dtypes", default=",".join(DTYPES))
    ap.add_argument("--no-ptxas", action="store_true")
    a = ap.parse_args(argv)
    rows = run(tuple(int(x) for x in a.archs.split(",")), ptxas=not a.no_ptxas,
               dtypes=tuple(a.dtypes.split(",")))
    print(json.dumps(rows) if a.json else report(rows))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
