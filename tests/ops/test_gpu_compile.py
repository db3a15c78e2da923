"""Ahead-of-time GPU compile of every Triton kernel variant the launchers can use (no GPU needed).

sm_90a (H100/H200, what we ship for): every dtype; fails on a compile error, shared memory over
the device limit, or any register spill. sm_80 (A100): bf16 variants must compile within its
shared memory (spills there are reported by `varformer bench --compile-report`, not failed)."""
import pytest

pytest.importorskip("triton")

from varformer import compile_check  # noqa: E402

KERNELS = {"mediator_fwd", "mediator_combine", "mediator_bwd_dkdv", "mediator_bwd_dq",
           "window_fwd", "window_bwd_dq", "window_bwd_dkdv", "vq_argmin", "vq_finish"}


@pytest.fixture(scope="module")
def rows():
    # three child compiles (each its own process), two at a time: the check is CPU-bound and
    # took 137 s serially on a 2-core machine
    from concurrent.futures import ThreadPoolExecutor
    jobs = [((90,), ("fp16", "bf16")), ((90,), ("fp32",)), ((80,), ("bf16",))]
    assert {d for _, ds in jobs[:2] for d in ds} == set(compile_check.DTYPES)
    with ThreadPoolExecutor(max_workers=2) as pool:
        parts = list(pool.map(lambda j: compile_check.run(archs=j[0], dtypes=j[1]), jobs))
    return [r for part in parts for r in part]


def test_inventory_covers_every_kernel():
    assert {e["name"] for e in compile_check.inventory()} == KERNELS


def test_every_variant_compiles_within_shared_memory(rows):
    bad = [f"{r['kernel']} {r['config']} {r['arch']}: {r['error']}" for r in rows if not r["ok"]]
    assert not bad, "\n".join(bad)
    assert all(r["shared"] <= compile_check.SMEM_LIMIT[int(r["arch"][3:])] for r in rows)
    assert {r["kernel"] for r in rows} == KERNELS


def test_no_register_spills_on_sm90(rows):
    sm90 = [r for r in rows if r["arch"] == "sm_90"]
    assert all(r.get("registers") for r in sm90), "ptxas report missing"
    spills = [f"{r['kernel']} {r['config']} {r['blocks']}: {r['spill_stores']} B"
              for r in sm90 if r.get("spill_stores")]
    assert not spills, "\n".join(spills)


def test_report_lists_every_row(rows):
    text = compile_check.report(rows)
    assert sum(line.startswith(("| mediator_", "| window_", "| vq_")) for line in text.splitlines()) \
        == len(rows)
    assert f"{len(rows)} variants, 0 failed" in text
