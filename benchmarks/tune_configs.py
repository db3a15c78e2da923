"""Pick, per kernel family, dtype class and head width, the largest tile that ptxas compiles for
sm_90a without register spills (offline, no GPU). Prints the tables for kernels/mediator_attention.py.

Run: python benchmarks/tune_configs.py [fwd|dkdv|dq]"""
import sys

from varformer import compile_check as cc
from varformer.kernels import mediator_attention as km

LP = [(128, 64, 8), (64, 64, 4), (64, 64, 8), (64, 32, 4), (64, 32, 8), (32, 64, 8), (32, 32, 4),
      (32, 32, 8), (16, 32, 8), (32, 16, 8), (16, 16, 4), (16, 16, 8)]
F32 = [(64, 32, 8), (32, 32, 4), (32, 32, 8), (32, 16, 8), (16, 32, 8), (16, 16, 4), (16, 16, 8)]
KERNELS = {"fwd": "mediator_fwd", "dkdv": "mediator_bwd_dkdv", "dq": "mediator_bwd_dq"}


def main(which):
    name = KERNELS[which]
    inv = [e for e in km.compile_inventory(("fp32", "bf16")) if e["name"] == name]
    table = {False: {}, True: {}}
    for f32, cands, labels in ((False, LP, ("bf16 ",)), (True, F32, ("fp32 ", "fp32/tf32 "))):
        for t in km.all_tiles(f32):
            entries = [e for e in inv if any(e["label"].startswith(lb) for lb in labels)
                       and e["constexprs"]["BLOCK_DV"] == t.BLOCK_DV
                       and e["constexprs"]["BLOCK_D2"] == t.BLOCK_D2
                       and e["constexprs"]["SINGLE"] == t.single]
            for bm, bn, w in cands:
                ok = True
                for e in entries:
                    e2 = dict(e, num_warps=w, constexprs=dict(e["constexprs"], BLOCK_M=bm, BLOCK_N=bn))
                    r = cc.compile_one(e2, 90)
                    if not r["ok"] or r.get("spill_stores"):
                        ok = False
                        break
                if ok:
                    table[f32][t.width] = (bm, bn, w)
                    break
            print(which, "fp32" if f32 else "lp", t.width, table[f32].get(t.width), flush=True)
    print(f"{which.upper()}_CFG = {table}")


if __name__ == "__main__":
    main(sys.argv[1])
