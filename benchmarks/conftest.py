"""pytest-benchmark cases: every bench_<op>.py test runs once per provider, size, dtype and mode;
bench_overhead.py and bench_e2e.py once per provider (and mode), at their fixed sizes.

``pytest benchmarks`` times them; ``pytest benchmarks --benchmark-disable`` (CI) runs each
once, as a smoke test that every provider, the inputs and the value check still work.

VAEKERN_BENCH_SIZES and VAEKERN_BENCH_DTYPES choose the cases (comma-separated, as for
``python -m benchmarks``); the default is one small float32 size, so that CI on a CPU takes
seconds. Providers that do not apply here skip with their reason. Triton is benchmarked on a
GPU only: tests/conftest.py sets TRITON_INTERPRET=1 on machines without one, and the time
of an interpreted kernel means nothing.

With ``--benchmark-disable`` the compile providers run ``torch.compile(backend="aot_eager")``:
the same Dynamo capture and AOTAutograd forward/backward split as Inductor, without its code
generation, which costs about 30 s cold on CI's two cores against about 3 s for everything
else. Set VAEKERN_BENCH_COMPILE_BACKEND=inductor to smoke-test Inductor as well; timed runs
always use Inductor.
"""

import os

from benchmarks import cases

CI_SIZES = "32x784:20"
CI_DTYPES = "float32"


def _env_list(name: str, default: str) -> list[str]:
    return [t.strip() for t in os.environ.get(name, default).split(",") if t.strip()]


def pytest_generate_tests(metafunc):
    # A bench file whose case has its own providers or modes (the overhead and e2e cases)
    # names them in module-level PROVIDERS and MODES.
    names = metafunc.fixturenames
    if "provider" in names:
        metafunc.parametrize("provider", getattr(metafunc.module, "PROVIDERS", cases.PROVIDERS))
    if "size" in names:
        sizes = [cases.Size.parse(s) for s in _env_list("VAEKERN_BENCH_SIZES", CI_SIZES)]
        metafunc.parametrize("size", sizes, ids=str)
    if "dtype" in names:
        dtypes = _env_list("VAEKERN_BENCH_DTYPES", CI_DTYPES)
        metafunc.parametrize("dtype", [cases.DTYPES[d] for d in dtypes], ids=dtypes)
    if "mode" in names:
        metafunc.parametrize("mode", getattr(metafunc.module, "MODES", cases.MODES))
