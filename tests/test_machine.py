"""The CPU line printed beside every benchmark figure, from /proc/cpuinfo text of x86 and ARM machines."""

from rsvlm_edge.machine import cpu_description, parse_cpuinfo

X86 = """processor\t: 0
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse2 avx avx2 fma
processor\t: 1
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse2 avx avx2 fma
"""
SPR = "model name\t: Intel(R) Xeon(R) Platinum 8480\nflags\t: avx2 avx512f avx512_vnni avx_vnni amx_tile amx_int8\n"
JETSON = "processor\t: 0\nBogoMIPS\t: 62.50\nFeatures\t: fp asimd evtstrm aes asimddp sve\nCPU part\t: 0xd42\n"


def test_x86_model_and_isa():
    assert parse_cpuinfo(X86) == ("AMD EPYC 7B13", ["AVX2"])
    assert parse_cpuinfo(SPR)[1] == ["AVX2", "AVX-512", "VNNI", "AVX-VNNI", "AMX"]


def test_arm_features_without_a_model_name(tmp_path):
    model, isa = parse_cpuinfo(JETSON)
    assert model == "" and isa == ["NEON", "dotprod", "SVE"]
    path = tmp_path / "cpuinfo"
    path.write_text(JETSON)
    assert cpu_description(path).endswith("(NEON, dotprod, SVE)")


def test_missing_cpuinfo_still_names_something(tmp_path):
    assert cpu_description(tmp_path / "absent")


def test_call_fresh_runs_a_function_in_a_new_interpreter():
    import os

    from rsvlm_edge.bench.fresh import call_fresh

    assert call_fresh("os", "getpid") != os.getpid()
    assert call_fresh("math", "hypot", 3, 4) == 5.0
