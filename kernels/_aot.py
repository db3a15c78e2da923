"""Shared helper of the ahead-of-time compile inventories (see varformer/compile_check.py)."""
import inspect


def entry(name, fn, ptrs: dict, floats: list, constexprs: dict, num_warps: int, label: str,
          num_stages: int = 3):
    """One launch variant: Triton signature (pointers as given, named floats fp32, other runtime
    arguments i32, constexprs marked) with its constexpr values and warps."""
    sig = {}
    for arg, p in inspect.signature(getattr(fn, "fn", fn)).parameters.items():
        if "constexpr" in str(p.annotation):
            sig[arg] = "constexpr"
        elif arg in ptrs:
            sig[arg] = ptrs[arg]
        else:
            sig[arg] = "fp32" if arg in floats else "i32"
    return dict(name=name, fn=fn, signature=sig, constexprs=constexprs, num_warps=num_warps,
                label=label, num_stages=num_stages)
