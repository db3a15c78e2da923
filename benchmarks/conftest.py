"""pytest-benchmark entries (`pytest benchmarks --benchmark-only`): the machine description that
pytest-benchmark stores with each run gains what `varformer bench` tables state (CPU model, ISA,
threads, load average, estimated FMA peak, and the GPU when there is one)."""


def pytest_benchmark_update_machine_info(config, machine_info):
    import torch

    from varformer.benchmarks import harness

    info = harness.cpu_info()
    machine_info["varformer"] = {
        "cpu": info["model"], "isa": info["simd"], "isa_flags": " ".join(info["isa"]),
        "threads": info["threads"], "loadavg": list(info["loadavg"]),
        "cpu_peak_gflops_fp32_est": round(info["peak_gflops_fp32"], 1),
        "cpu_peak_formula": info["peak_formula"],
        "device": harness.describe_device("cuda" if torch.cuda.is_available() else "cpu"),
        "torch": torch.__version__}
