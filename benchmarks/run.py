"""``python -m benchmarks``: time every provider of the VAE-loss ops on this machine.

For each op, size, dtype and mode it runs every provider that applies here (see cases.py),
checks its value against the float64 reference, times it (timing.py), measures its peak
memory, and reports time, floor bytes, achieved GB/s, the share of this device's own copy
bandwidth, and the speed-up over eager PyTorch and over torch.compile.

Two more cases time whole calls, where host overhead counts: ``overhead``, ``vae_loss`` on 1x1
tensors, forward+backward and the no-grad forward (cases.py); ``e2e``, one training step of the
pytorch/examples MLP VAE with each loss, and the loss's share of it (e2e.py). Their sizes and
modes are fixed; --sizes, --dtypes, --target-dtype and --modes apply to the other ops only.

Output: markdown tables on stdout; results.csv, results.json, results.md and PNG plots in
results/<device>_torch<ver>_triton<ver>_<gitrev>/ (or --out). The CSV is rewritten after
every case, so a run cut short keeps what it measured.

    python -m benchmarks                                   # everything that applies here
    python -m benchmarks --ops vae_loss --modes fwd+bwd --sizes 128x784:20,4096x3072:64 \\
        --providers eager,compile,reference,cpu
    python -m benchmarks --ops overhead,e2e                # the two whole-call cases
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import pathlib
import platform
import re
import signal
import subprocess
import sys
import time
import traceback

import torch

from benchmarks import cases, e2e, timing
from benchmarks.cases import Case, Size

ROOT = pathlib.Path(__file__).resolve().parent.parent

FIELDS = (
    "op", "size", "batch", "dim", "latent", "dtype", "target_dtype", "mode", "provider", "status",
    "median_ms", "p20_ms", "p80_ms", "reps", "timer", "floor_bytes", "gbps", "pct_copy_bw",
    "speedup_vs_eager", "speedup_vs_compile", "peak_mem_bytes", "peak_alloc_bytes", "peak_rss_bytes",
    "check_err", "check_ok",
    "first_call_s", "n_sets", "loss_ms", "loss_p20_ms", "loss_p80_ms", "loss_share",
)  # fmt: skip
# The ops of cases.py, then the two cases that time whole calls.
ALL_OPS = (*cases.OPS, cases.OVERHEAD, e2e.OP)


def _csv_list(text: str, allowed=None, what="value") -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if allowed is not None:
        bad = [t for t in items if t not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {what} {bad}; choose from {list(allowed)}")
    return items


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    p.add_argument("--ops", type=lambda s: _csv_list(s, ALL_OPS, "op"), default=list(ALL_OPS),
                   help=f"comma-separated, from {','.join(ALL_OPS)} (default: all)")
    p.add_argument("--sizes", type=lambda s: [Size.parse(t) for t in _csv_list(s)], default=None,
                   help=f"BxD:Z list (default on GPU: {','.join(cases.GPU_SIZES)}; "
                        f"on CPU: {','.join(cases.CPU_SIZES)})")
    p.add_argument("--dtypes", type=lambda s: _csv_list(s, cases.DTYPES, "dtype"), default=None,
                   help="input dtypes (default: float32,bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--target-dtype", default="same", choices=["same", *cases.TARGET_DTYPES],
                   help="dtype of the target images (default: the input dtype)")
    p.add_argument("--modes", type=lambda s: _csv_list(s, cases.MODES, "mode"), default=list(cases.MODES))
    p.add_argument("--providers", type=lambda s: _csv_list(s, cases.PROVIDERS, "provider"),
                   default=list(cases.PROVIDERS), help="default: every provider that applies here")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when a GPU is visible)")
    p.add_argument("--out", type=pathlib.Path, default=None, help="results folder")
    p.add_argument("--rep-ms", type=float, default=100.0, help="GPU: time spent timing each case")
    p.add_argument("--warmup-ms", type=float, default=25.0, help="GPU: warm-up per case")
    p.add_argument("--min-run-time", type=float, default=1.0,
                   help="CPU, and overhead and e2e on any device: seconds per case")
    p.add_argument("--threads", type=int, default=None, help="CPU: torch threads (default: torch's)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="stop starting new cases after this long; the rest are marked skipped")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


# ---- environment ------------------------------------------------------------------------------


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def git_rev() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "nogit"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-")


def environment(device: torch.device, threads: int) -> dict:
    import vaekern

    env = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": device.type,
        "device_name": timing.device_name(device),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "vaekern": vaekern.__version__,
        "git": git_rev(),
        "available_backends": vaekern.available_backends(device),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
        "command": " ".join([os.path.basename(sys.executable), "-m", "benchmarks", *sys.argv[1:]]),
        "memory_method": timing.MEMORY_METHOD[device.type],
        "cache_bytes": timing.cache_bytes(device),
        "loadavg_start": timing.load_average(),
    }
    if device.type == "cpu":
        env["threads"] = threads
    return env


def default_out(env: dict) -> pathlib.Path:
    name = env["device_name"].split(" (")[0] if env["device"] == "cpu" else env["device_name"]
    tag = f"{env['device']}-{name}" if env["device"] == "cpu" else name
    return ROOT / "results" / _slug(f"{tag}_torch{env['torch']}_triton{env['triton']}_{env['git']}")


# ---- measuring --------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _base_row(case: Case, provider: str) -> dict:
    row = dict.fromkeys(FIELDS, "")
    row.update(op=case.op, size=str(case.size), batch=case.size.batch, dim=case.size.dim,
               latent=case.size.latent, dtype=cases.dtype_name(case.dtype),
               target_dtype=cases.dtype_name(case.target_dtype), mode=case.mode, provider=provider,
               floor_bytes=cases.floor_bytes(case))
    return row


def measure(case: Case, provider: str, sets, timer, *, memory: bool, checks: dict) -> dict:
    """One row: check, time and measure ``provider`` on ``case``."""
    row = _base_row(case, provider)
    row["n_sets"] = len(sets)
    step = cases.Step(case, provider, sets)
    t0 = time.perf_counter()
    step.run_once()  # the compile, for torch.compile, on the first mode of each shape
    _sync(case.device)
    row["first_call_s"] = round(time.perf_counter() - t0, 4)
    key = (case.op, case.size, case.dtype, case.target_dtype, provider)
    if key not in checks:
        checks[key] = cases.check(case, provider, sets[0])
    err = checks[key]
    row["check_err"], row["check_ok"] = err, cases.check_ok(case, err)
    step.run_once()
    if case.mode == "bwd":
        t = timer(step.backward, step.setup)
    else:
        t = timer(step)
    row.update(median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, reps=t.reps, timer=t.timer)
    row["gbps"] = row["floor_bytes"] / (t.median_ms * 1e-3) / 1e9
    if memory:
        add_memory(row, step)
    row["status"] = "ok"
    return row


def add_memory(row: dict, step: cases.Step) -> None:
    if step.case.mode == "bwd":
        mem = timing.peak_bytes(step.case.device, step.backward, step.setup)
    else:
        mem = timing.peak_bytes(step.case.device, step)
    row["peak_mem_bytes"] = mem["peak"]
    row["peak_alloc_bytes"] = mem.get("alloc", "")
    row["peak_rss_bytes"] = "" if mem.get("rss") is None else mem["rss"]


def cpu_memory_pass(rows: list[dict], device: torch.device, bar) -> None:
    """Peak memory of every measured CPU row, after all timings (see timing.py: it changes
    glibc's allocation policy for the rest of the process)."""
    timing.fixed_mmap_threshold()
    groups: dict = {}
    for r in rows:
        if r["status"] == "ok" and r["op"] in cases.OPS:
            groups.setdefault((r["op"], r["size"], r["dtype"], r["target_dtype"]), []).append(r)
    for (op, size, dtype, tdtype), group in groups.items():
        proto = Case(op, Size.parse(size), cases.DTYPES[dtype], cases.TARGET_DTYPES[tdtype], "fwd+bwd",
                     device)
        sets = [cases.make_inputs(proto) for _ in range(2)]
        for r in group:
            bar.set_postfix_str(f"memory: {op} {size} {dtype} {r['mode']} {r['provider']}")
            step = cases.Step(dataclasses.replace(proto, mode=r["mode"]), r["provider"], sets)
            step.run_once()
            add_memory(r, step)
            bar.update()


def add_ratios(rows: list[dict], copy_gbps: float) -> None:
    """Fill % of copy bandwidth and the speed-ups over the baselines of the same case."""
    key = lambda r: (r["op"], r["size"], r["dtype"], r["target_dtype"], r["mode"])  # noqa: E731
    base = {(key(r), r["provider"]): r["median_ms"] for r in rows if r["status"] == "ok"}
    for r in rows:
        if r["status"] != "ok":
            continue
        if r["gbps"] != "":
            r["pct_copy_bw"] = 100 * r["gbps"] / copy_gbps
        for b in cases.BASELINES:
            t = base.get((key(r), b))
            r[f"speedup_vs_{b}"] = t / r["median_ms"] if t else ""


# ---- output ---------------------------------------------------------------------------------


def _fmt(x, spec: str) -> str:
    return "" if x == "" or x is None else format(x, spec)


def markdown(rows: list[dict], env: dict, copy_gbps: float, copy_how: str) -> str:
    head = (
        f"{env['device_name']}, torch {env['torch']}, triton {env['triton']}, vaekern {env['vaekern']} "
        f"({env['git']}), {env['date']}"
        + (f", {env['threads']} thread{'s' * (env['threads'] != 1)}" if "threads" in env else "")
        + f"\n\nCopy bandwidth: {copy_gbps:.1f} GB/s ({copy_how}, read + write)."
        + f" Peak memory: {env['memory_method']}."
        + f" Load average (1/5/15 min) at start: {env['loadavg_start']},"
        + f" at end: {env.get('loadavg_end', '')}.\n\n"
    )
    cols = ["op", "size", "dtype", "mode", "provider", "median ms", "p20-p80 ms", "floor MB", "GB/s",
            "% copy BW", "x eager", "x compile", "peak MB", "check"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        if r["status"].startswith("skipped") or r["op"] not in cases.OPS:
            continue
        dtype = r["dtype"] if r["target_dtype"] == r["dtype"] else f"{r['dtype']}/{r['target_dtype']}"
        if r["status"] != "ok":
            cells = [r["op"], r["size"], dtype, r["mode"], r["provider"], r["status"]] + [""] * 8
        else:
            check = ("ok " if r["check_ok"] else "FAIL ") + format(r["check_err"], ".1e")
            peak = _fmt(r["peak_mem_bytes"] / 1e6 if r["peak_mem_bytes"] != "" else "", ".2f")
            cells = [r["op"], r["size"], dtype, r["mode"], r["provider"], f"{r['median_ms']:.3f}",
                     f"{r['p20_ms']:.3f}-{r['p80_ms']:.3f}", f"{r['floor_bytes'] / 1e6:.2f}",
                     f"{r['gbps']:.1f}", f"{r['pct_copy_bw']:.1f}", _fmt(r["speedup_vs_eager"], ".2f"),
                     _fmt(r["speedup_vs_compile"], ".2f"), peak, check]
        lines.append("| " + " | ".join(cells) + " |")
    tables = ["\n".join(lines)] if any(r["op"] in cases.OPS for r in rows) else []
    tables += [t for t in (_overhead_table(rows), _e2e_table(rows)) if t]
    skipped = sorted({f"{r['provider']}: {r['status'].removeprefix('skipped: ')}"
                      for r in rows if r["status"].startswith("skipped")})
    tail = ("\n\nNot run: " + "; ".join(skipped) + ".") if skipped else ""
    return head + "\n\n".join(tables) + tail + "\n"


def _check_cell(r: dict) -> str:
    if r["check_err"] == "":
        return "n/a"
    return ("ok " if r["check_ok"] else "FAIL ") + format(r["check_err"], ".1e")


def _ratio(r: dict, baseline: str) -> str:
    # time / baseline's time: the inverse of the speed-up columns (below 1 is faster).
    s = r[f"speedup_vs_{baseline}"]
    return "" if s == "" else f"{1 / s:.2f}"


def _overhead_table(rows: list[dict]) -> str:
    sel = [r for r in rows if r["op"] == cases.OVERHEAD and not r["status"].startswith("skipped")]
    if not sel:
        return ""
    lines = [f"Overhead: vae_loss on {cases.OVERHEAD_SIZE} float32 tensors (B = D = Z = 1), time per "
             "call in µs, the providers of a mode timed in turn; ÷ eager and ÷ compile are this "
             "row's time over theirs.", "",
             "| mode | provider | median µs | p20-p80 µs | ÷ eager | ÷ compile | check |",
             "|" + "---|" * 7]
    for r in sel:
        if r["status"] != "ok":
            lines.append(f"| {r['mode']} | {r['provider']} | {r['status']} |  |  |  |  |")
            continue
        lines.append(f"| {r['mode']} | {r['provider']} | {r['median_ms'] * 1e3:.1f} | "
                     f"{r['p20_ms'] * 1e3:.1f}-{r['p80_ms'] * 1e3:.1f} | {_ratio(r, 'eager')} | "
                     f"{_ratio(r, 'compile')} | {_check_cell(r)} |")
    return "\n".join(lines)


def _e2e_table(rows: list[dict]) -> str:
    sel = [r for r in rows if r["op"] == e2e.OP and not r["status"].startswith("skipped")]
    if not sel:
        return ""
    lines = [f"End to end: one training step of the pytorch/examples MLP VAE ({e2e.PIXELS}-{e2e.HIDDEN}-"
             f"{e2e.LATENT}, batch {e2e.BATCH}, float32, Adam lr {e2e.LR:g}) with each loss, every "
             "provider timed in turn. Loss ms: the step minus the same step with a null loss (null; "
             "compile-null for compile), median and p20-p80 over rounds; see benchmarks/e2e.py.", "",
             "| provider | ms/step | p20-p80 ms | ÷ eager | ÷ compile | loss ms | p20-p80 ms | loss share "
             "| check |",
             "|" + "---|" * 9]
    for r in sel:
        if r["status"] != "ok":
            lines.append(f"| {r['provider']} | {r['status']} |  |  |  |  |  |  |  |")
            continue
        share = _fmt(r["loss_share"] * 100 if r["loss_share"] != "" else "", ".0f")
        spread = f"{r['loss_p20_ms']:.3f}-{r['loss_p80_ms']:.3f}" if r["loss_ms"] != "" else ""
        lines.append(f"| {r['provider']} | {r['median_ms']:.3f} | {r['p20_ms']:.3f}-{r['p80_ms']:.3f} | "
                     f"{_ratio(r, 'eager')} | {_ratio(r, 'compile')} | {_fmt(r['loss_ms'], '.3f')} | "
                     f"{spread} | {share}{' %' if share else ''} | {_check_cell(r)} |")
    return "\n".join(lines)


def write_csv(rows: list[dict], path: pathlib.Path) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)


def plot(rows: list[dict], out: pathlib.Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots", file=sys.stderr)
        return []
    ok = [r for r in rows if r["status"] == "ok" and r["op"] in cases.OPS]
    group = lambda r: (r["op"], r["dtype"], r["target_dtype"], r["mode"])  # noqa: E731
    written = []
    for op, dtype, tdtype, mode in sorted({group(r) for r in ok}):
        sel = [r for r in ok if group(r) == (op, dtype, tdtype, mode)]
        sizes = sorted({Size.parse(r["size"]) for r in sel}, key=lambda s: (s.batch * s.dim, s.latent))
        xs = {str(s): i for i, s in enumerate(sizes)}
        fig, (ax_t, ax_bw) = plt.subplots(1, 2, figsize=(11, 4.2))
        for prov in [p for p in cases.PROVIDERS if any(r["provider"] == p for r in sel)]:
            pts = sorted((xs[r["size"]], r["median_ms"], r["gbps"]) for r in sel if r["provider"] == prov)
            ax_t.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=prov)
            ax_bw.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=prov)
        for ax, ylabel in ((ax_t, "median time (ms)"), (ax_bw, "GB/s (floor bytes / time)")):
            ax.set_xticks(range(len(sizes)), [str(s) for s in sizes])
            ax.set_xlabel("size (BxD:Z)")
            ax.set_ylabel(ylabel)
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
        ax_t.legend(fontsize=8)
        dt = dtype if tdtype == dtype else f"{dtype}, target {tdtype}"
        fig.suptitle(f"{op}, {dt}, {mode}")
        fig.tight_layout()
        name = f"{op}_{dtype}{'' if tdtype == dtype else '_' + tdtype}_{mode.replace('+', '_')}.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)
    return written


def _progress(total: int, disable: bool):
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is None or disable:
        class _Quiet:
            def update(self, n=1): pass
            def set_postfix_str(self, s): pass
            def close(self): pass
            @staticmethod
            def write(s): print(s, file=sys.stderr)
        return _Quiet()
    return tqdm(total=total, desc="benchmarks", unit="case", file=sys.stderr, dynamic_ncols=True,
                mininterval=0.5 if sys.stderr.isatty() else 10.0)


# ---- main -----------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    # SIGINT ends the run but keeps its results, even when started with SIGINT ignored (a
    # background job); `timeout -s INT` in gpu.sh relies on it. SIGTERM does the same.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit("--device cuda: no GPU is visible")
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        sys.exit(f"--device must be cuda or cpu, got {args.device!r}")
    threads = args.threads or torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(threads)
    gpu = device.type == "cuda"
    sizes = args.sizes or [Size.parse(s) for s in (cases.GPU_SIZES if gpu else cases.CPU_SIZES)]
    dtypes = [cases.DTYPES[d] for d in (args.dtypes or (["float32", "bfloat16"] if gpu else ["float32"]))]
    torch.manual_seed(0)

    env = environment(device, threads)
    out = args.out or default_out(env)
    out.mkdir(parents=True, exist_ok=True)
    timer = timing.make_timer(device, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms,
                              min_run_time=args.min_run_time, threads=threads)
    copy_gbps, copy_how = timing.copy_bandwidth(device, timer)
    env.update(copy_gbps=copy_gbps, copy_method=copy_how)
    print(f"{env['device_name']}: copy bandwidth {copy_gbps:.1f} GB/s ({copy_how}); results in {out}",
          file=sys.stderr)

    cache = timing.cache_bytes(device)
    start = time.perf_counter()
    rows: list[dict] = []
    # dtype outermost: a run cut short by --max-seconds still has every op at the first dtype.
    combos = [(op, size, dt) for dt in dtypes for op in args.ops if op in cases.OPS for size in sizes]
    # The floor comes with every overhead run: it is the bound the other rows are read against.
    overhead = [p for p in cases.OVERHEAD_PROVIDERS if p in args.providers or p == cases.FLOOR]
    overhead = overhead if cases.OVERHEAD in args.ops else []
    steps = _e2e_providers(args.providers) if e2e.OP in args.ops else []
    total = len(combos) * len(args.modes) * len(args.providers) + len(cases.OVERHEAD_MODES) * len(overhead)
    bar = _progress(total + len(steps), args.no_progress)
    # The cases that time whole calls: every provider in turn, with no L2 flush, on any device.
    loop_timer = timing.LoopTimer(min_run_time=args.min_run_time, threads=threads)
    try:
        _run_all(args, combos, device, cache, timer, rows, out, copy_gbps, start, bar)
        _run_overhead(args, overhead, device, loop_timer, rows, out, copy_gbps, start, bar)
        _run_e2e(args, steps, device, loop_timer, rows, out, copy_gbps, start, bar)
        if device.type == "cpu" and not args.no_memory:
            bar.close()
            bar = _progress(sum(r["status"] == "ok" and r["op"] in cases.OPS for r in rows), args.no_progress)
            cpu_memory_pass(rows, device, bar)
    except KeyboardInterrupt:  # Ctrl-C, or `timeout -s INT`: keep and report what was measured
        env["interrupted"] = True
        print("\ninterrupted: writing the cases measured so far", file=sys.stderr)
    bar.close()
    env["loadavg_end"] = timing.load_average()

    add_ratios(rows, copy_gbps)
    table = markdown(rows, env, copy_gbps, copy_how)
    write_csv(rows, out / "results.csv")
    (out / "results.md").write_text(table)
    finite = lambda v: None if isinstance(v, float) and not math.isfinite(v) else v  # noqa: E731
    clean = [{k: finite(v) for k, v in r.items()} for r in rows]
    (out / "results.json").write_text(json.dumps({"environment": env, "rows": clean}, indent=1) + "\n")
    plots = [] if args.no_plots else plot(rows, out)
    print(table)
    print(f"wrote {out}/results.csv, results.json, results.md and {len(plots)} plots", file=sys.stderr)
    failed = [r for r in rows if r["status"].startswith("error") or r["check_ok"] is False]
    return 130 if env.get("interrupted") else (1 if failed else 0)


def _run_all(args, combos, device, cache, timer, rows, out, copy_gbps, start, bar) -> None:
    gpu = device.type == "cuda"
    checks: dict = {}
    for op, size, dtype in combos:
        tdtype = dtype if args.target_dtype == "same" else cases.TARGET_DTYPES[args.target_dtype]
        # Inputs for fwd+bwd include everything any mode needs (grad_z for reparameterize).
        proto = Case(op, size, dtype, tdtype, "fwd+bwd", device)
        sets = None
        for mode in args.modes:
            case = dataclasses.replace(proto, mode=mode)
            for provider in args.providers:
                bar.set_postfix_str(f"{op} {size} {cases.dtype_name(dtype)} {mode} {provider}")
                reason = cases.skip_reason(provider, op, device)
                spent = time.perf_counter() - start
                if reason is None and args.max_seconds is not None and spent > args.max_seconds:
                    reason = f"time budget of {args.max_seconds:.0f} s spent"
                if reason is not None:
                    row = _base_row(case, provider)
                    row["status"] = f"skipped: {reason}"
                    rows.append(row)
                    bar.update()
                    continue
                try:
                    if sets is None:
                        sets = [cases.make_inputs(proto) for _ in range(cases.n_sets(proto, cache))]
                    # CPU memory is measured after all timings (cpu_memory_pass).
                    memory = gpu and not args.no_memory
                    rows.append(measure(case, provider, sets, timer, memory=memory, checks=checks))
                except Exception as e:  # one failing provider must not end the run
                    bar.write(f"{op} {size} {cases.dtype_name(dtype)} {mode} {provider}: "
                              f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=-3)}")
                    row = _base_row(case, provider)
                    first_line = str(e).splitlines()[0][:80] if str(e) else ""
                    row["status"] = f"error: {type(e).__name__}: {first_line}"
                    rows.append(row)
                    if gpu:
                        torch.cuda.empty_cache()
                bar.update()
        del sets
        if gpu:
            torch.cuda.empty_cache()
        add_ratios(rows, copy_gbps)
        write_csv(rows, out / "results.csv")


# ---- the cases that time whole calls: overhead and e2e -------------------------------------


def _budget_spent(args, start: float) -> str | None:
    if args.max_seconds is not None and time.perf_counter() - start > args.max_seconds:
        return f"time budget of {args.max_seconds:.0f} s spent"
    return None


def _error(e: Exception, label: str, row: dict, bar, device: torch.device) -> None:
    bar.write(f"{label}: {type(e).__name__}: {e}\n{traceback.format_exc(limit=-3)}")
    first_line = str(e).splitlines()[0][:80] if str(e) else ""
    row["status"] = f"error: {type(e).__name__}: {first_line}"
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _prepare(row: dict, label: str, prepare, bar, device: torch.device):
    """``prepare()``'s result, or None with ``row`` marked as an error: one failing provider
    must not end the run."""
    try:
        return prepare()
    except Exception as e:
        _error(e, label, row, bar, device)
        return None


def _time_together(ready: dict, timer: timing.LoopTimer, label: str, bar, device) -> dict[str, timing.Timing]:
    """Time the prepared calls of ``ready`` (provider: (row, call)) together and fill their rows."""
    if not ready:
        return {}
    bar.set_postfix_str(f"{label}: timing {', '.join(ready)} in turn")
    try:
        timings = timer({provider: call for provider, (_, call) in ready.items()})
    except Exception as e:
        for row, _ in ready.values():
            _error(e, label, row, bar, device)
        return {}
    for provider, (row, _) in ready.items():
        t = timings[provider]
        row.update(median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, reps=t.reps, timer=t.timer,
                   status="ok")
    return timings


def _prepare_overhead(case: Case, provider: str, sets, row: dict) -> cases.Step:
    """Warm ``provider`` up and check it against the reference; the step to time."""
    step = cases.Step(case, provider, sets)
    t0 = time.perf_counter()
    step.run_once()  # the compile, for torch.compile
    _sync(case.device)
    row["first_call_s"] = round(time.perf_counter() - t0, 4)
    err = cases.check(case, provider, sets[0])
    if err is not None:  # the floor computes another value
        row["check_err"], row["check_ok"] = err, cases.check_ok(case, err)
    step.run_once()
    return step


def _run_overhead(args, providers, device, timer, rows, out, copy_gbps, start, bar) -> None:
    """The overhead case (cases.py): vae_loss on 1x1 float32, forward+backward and no-grad,
    with the providers of each mode timed together."""
    for mode in cases.OVERHEAD_MODES if providers else ():
        case = cases.overhead_case(mode, device)
        # Two sets, rotated as for the ops: at 1x1 there is no cache to defeat.
        sets = [cases.make_inputs(dataclasses.replace(case, mode="fwd+bwd")) for _ in range(2)]
        ready = {}
        for provider in providers:
            label = f"{cases.OVERHEAD} {mode} {provider}"
            bar.set_postfix_str(label)
            row = {**_base_row(case, provider), "op": cases.OVERHEAD, "n_sets": len(sets), "status": "not timed"}
            rows.append(row)
            reason = cases.skip_reason(provider, case.op, device) or _budget_spent(args, start)
            if reason is not None:
                row["status"] = f"skipped: {reason}"
            elif (step := _prepare(row, label, lambda: _prepare_overhead(case, provider, sets, row),
                                   bar, device)) is not None:
                ready[provider] = (row, step)
            bar.update()
        _time_together(ready, timer, f"{cases.OVERHEAD} {mode}", bar, device)
        add_ratios(rows, copy_gbps)
        write_csv(rows, out / "results.csv")


def _e2e_providers(asked: list[str]) -> list[str]:
    """The e2e providers asked for, with the null steps that their loss times need."""
    wanted = [p for p in asked if p in e2e.PROVIDERS]
    nulls = {e2e.null_baseline(p) for p in wanted}
    return [p for p in e2e.PROVIDERS if p in wanted or p in nulls]


def _prepare_e2e(provider: str, device: torch.device, row: dict) -> e2e.TrainStep:
    """Build ``provider``'s training step, check its loss and warm it up; the step to time."""
    t0 = time.perf_counter()
    step = e2e.TrainStep(provider, device)
    err = e2e.check(step)  # the first forward: the compile, for torch.compile
    step()
    _sync(device)
    row["first_call_s"] = round(time.perf_counter() - t0, 4)
    if err is not None:  # the null steps have no loss to check
        row["check_err"], row["check_ok"] = err, e2e.check_ok(err)
    step()
    return step


def _run_e2e(args, providers, device, timer, rows, out, copy_gbps, start, bar) -> None:
    """The e2e case (e2e.py): one training step of the pytorch/examples VAE per loss, all timed
    together; each loss's time is the median, round by round, of its step's block minus the
    null step's block of the same round."""
    ready = {}
    for provider in providers:
        label = f"{e2e.OP} {provider}"
        bar.set_postfix_str(label)
        row = dict.fromkeys(FIELDS, "")
        row.update(op=e2e.OP, size=e2e.SIZE, batch=e2e.BATCH, dim=e2e.PIXELS, latent=e2e.LATENT,
                   dtype="float32", target_dtype="float32", mode=e2e.MODE, provider=provider,
                   n_sets=e2e.N_BATCHES, status="not timed")
        rows.append(row)
        reason = e2e.skip_reason(provider, device) or _budget_spent(args, start)
        if reason is not None:
            row["status"] = f"skipped: {reason}"
        elif (step := _prepare(row, label, lambda: _prepare_e2e(provider, device, row), bar, device)) is not None:
            ready[provider] = (row, step)
        bar.update()
    timings = _time_together(ready, timer, e2e.OP, bar, device)
    for provider, t in timings.items():
        null = timings.get(e2e.null_baseline(provider))
        if provider in e2e.NULL_PROVIDERS or null is None:
            continue
        loss = [a - b for a, b in zip(t.blocks, null.blocks)]
        row = ready[provider][0]
        row.update(loss_ms=timing.quantile(loss, 0.5), loss_p20_ms=timing.quantile(loss, 0.2),
                   loss_p80_ms=timing.quantile(loss, 0.8))
        row["loss_share"] = row["loss_ms"] / row["median_ms"]
    add_ratios(rows, copy_gbps)
    write_csv(rows, out / "results.csv")
