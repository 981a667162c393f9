"""Turn bench results into results.md (tables + target verdicts) and chart.png."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _raw_best(results: dict[str, Any], model: str, batch: int) -> dict[str, Any]:
    served = [
        r
        for r in results["raw"]
        if r["model"] == model and r["batch"] == batch and "model.predict" not in r["backend"]
    ]
    return max(served, key=lambda r: r["img_per_s"])


def _run(results: dict[str, Any], section: str, target: str, connections: int) -> dict[str, Any]:
    return next(
        r for r in results[section]["runs"] if r["target"] == target and r["connections"] == connections
    )


def _bentoml_targets(results: dict[str, Any]) -> list[tuple[str, str, bool]]:
    if not results.get("bentoml"):
        return [("Ahead of BentoML (same model, same machine)", "BentoML not installed: not measured", False)]
    rows = []
    for connections in (1, 8):
        ours = _run(results, "e2e", "resnet50", connections)
        theirs = next(r for r in results["bentoml"]["runs"] if r["connections"] == connections)
        rows.append(
            (
                f"Ahead of BentoML at c={connections} (img/s, p50)",
                f"{ours['img_per_s']} vs {theirs['img_per_s']} img/s; "
                f"p50 {ours['p50_ms']} vs {theirs['p50_ms']} ms",
                ours["img_per_s"] > theirs["img_per_s"] and ours["p50_ms"] < theirs["p50_ms"],
            )
        )
    return rows


def targets(results: dict[str, Any]) -> list[tuple[str, str, bool]]:
    best = _raw_best(results, "resnet50", 1)
    c8, c1 = _run(results, "e2e", "resnet50", 8), _run(results, "e2e", "resnet50", 1)
    seed8 = next(r for r in results["seed"]["runs"] if r["connections"] == 8)
    batch1_ms = 1000 / best["img_per_s"]
    memory = sum(results["e2e"]["memory_after_mb"].values())
    warm = sum(results["e2e"]["memory_warm_mb"].values())
    return [
        (
            "ResNet50 e2e c=8 >= 90% of best raw batch-1",
            f"{c8['img_per_s']} vs {best['img_per_s']} img/s ({best['backend']}): "
            f"{c8['img_per_s'] / best['img_per_s']:.0%}",
            c8["img_per_s"] >= 0.9 * best["img_per_s"],
        ),
        (
            "ResNet50 e2e c=8 >= 3x seed-style baseline",
            f"{c8['img_per_s']} vs {seed8['img_per_s']} img/s: "
            f"{c8['img_per_s'] / max(seed8['img_per_s'], 1e-9):.1f}x",
            c8["img_per_s"] >= 3 * seed8["img_per_s"],
        ),
        *_bentoml_targets(results),
        (
            "ResNet50 e2e c=1 p50 <= best raw batch-1 time + 15 ms",
            f"{c1['p50_ms']} ms vs {batch1_ms:.1f} + 15 ms",
            c1["p50_ms"] <= batch1_ms + 15,
        ),
        (
            "Gateway + Nginx add <= 3 ms at p50 (stub services)",
            f"{results['overhead']['added_p50_ms']} ms",
            results["overhead"]["added_p50_ms"] <= 3,
        ),
        (
            "12 MP JPEG ingestion >= 4x plain Pillow",
            f"{results['ingestion']['speedup']}x",
            results["ingestion"]["speedup"] >= 4,
        ),
        (
            "Fleet <= 1.6 GB resident on converted backends",
            f"{memory / 1024:.2f} GB after load",
            memory <= 1.6 * 1024,
        ),
        (
            "No memory growth across the benchmark (<= 10% after warm-up)",
            f"{warm:.0f} -> {memory:.0f} MB",
            memory <= 1.1 * warm,
        ),
        *_overload_targets(results),
    ]


def _overload_targets(results: dict[str, Any]) -> list[tuple[str, str, bool]]:
    if not results.get("overload"):
        return []
    o = results["overload"]
    shed, accepted = o["overload"]["shed_latency"], o["overload"]["accepted_latency"]
    unloaded = o["unloaded"]["p99_ms"]
    return [
        (
            f"Overload at {o['factor']:g}x capacity: shed within 100 ms",
            f"{o['overload']['shed']} shed, p99 {shed['p99_ms']} ms, max {shed['max_ms']} ms",
            shed["p99_ms"] <= 100,
        ),
        (
            f"Overload at {o['factor']:g}x capacity: accepted p99 <= 2x unloaded p99",
            f"{accepted['p99_ms']} vs 2 x {unloaded} ms: {accepted['p99_ms'] / unloaded:.2f}x",
            accepted["p99_ms"] <= 2 * unloaded,
        ),
    ]


def _overload_section(results: dict[str, Any]) -> list[str]:
    if not results.get("overload"):
        return []
    o = results["overload"]
    u, c, r = o["unloaded"], o["capacity"], o["overload"]
    accepted, shed = r["accepted_latency"], r["shed_latency"]
    return [
        "",
        f"## 7. Overload: open loop at {o['factor']:g}x capacity ({o['model']}, default admission bound)",
        "",
        f"- unloaded (1 client): {u['req_per_s']} req/s, p50 {u['p50_ms']} ms, p99 {u['p99_ms']} ms",
        f"- capacity (2 clients): {c['req_per_s']} req/s, p50 {c['p50_ms']} ms, p99 {c['p99_ms']} ms",
        f"- offered {r['offered_req_per_s']} req/s for {r['requests']} requests: {r['accepted']} accepted "
        f"({r['goodput_req_per_s']} req/s goodput), {r['shed']} shed "
        f"({r['shed_with_retry_after']} with Retry-After), {r['other_errors']} other errors",
        f"- accepted latency p50 {accepted['p50_ms']} ms, p99 {accepted['p99_ms']} ms; shed answered in "
        f"p50 {shed['p50_ms']} ms, p99 {shed['p99_ms']} ms, max {shed['max_ms']} ms",
        f"- model time per image during the run: {o['service_batching']['ms_per_image']:.0f} ms "
        "(the load generator and the shed requests share the machine's cores with inference)",
    ]


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"# Benchmark ({results['started']}, {results['machine']['cpus']} CPUs, "
        f"{results['seconds_per_run']} s per load run, random weights)",
        "",
        "## Targets",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {value} | {'yes' if ok else '**no**'} |" for name, value, ok in targets(results)]
    lines += [
        "",
        "## 1. Raw in-process throughput (img/s)",
        "",
        "| model | backend | batch 1 | batch 8 |",
        "|---|---|---|---|",
    ]
    seen = []
    for r in results["raw"]:
        if (r["model"], r["backend"]) not in seen:
            seen.append((r["model"], r["backend"]))
    for model, backend in seen:
        rate = {
            r["batch"]: r["img_per_s"]
            for r in results["raw"]
            if (r["model"], r["backend"]) == (model, backend)
        }
        lines.append(f"| {model} | {backend} | {rate.get(1, '')} | {rate.get(8, '')} |")
    lines += [
        "",
        "## 2-3. End to end under load (one JPEG photo per request, 451x300)",
        "",
        "| target | path | concurrency | img/s | p50 ms | p95 ms | p99 ms | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in (
        results["e2e"]["runs"] + results["seed"]["runs"] + (results.get("bentoml") or {}).get("runs", [])
    ):
        lines.append(
            f"| {r['target']} | {r['path']} | {r['connections']} | {r['img_per_s']} | {r['p50_ms']} | "
            f"{r['p95_ms']} | {r['p99_ms']} | {r['errors']} |"
        )
    lines += [
        "",
        f"Backends served: {results['e2e']['backends']}.",
        "",
        "Batching after the load (requests, images, batches, largest batch):",
        "",
    ]
    for name, stats in results["e2e"]["batching"].items():
        avg = stats["images"] / max(stats["batches"], 1)
        lines.append(
            f"- {name}: {stats['requests']} requests, {stats['images']} images in {stats['batches']} "
            f"batches (average {avg:.2f}, largest {stats['largest_batch']}), {stats['rejected']} rejected"
        )
    o = results["overhead"]
    lines += [
        "",
        "## 4. Gateway + Nginx overhead (stub model services)",
        "",
        f"- p50 straight to a stub service: {o['direct_stub_p50_ms']} ms; through Nginx and the gateway: "
        f"{o['edge_stub_p50_ms']} ms (added {o['added_p50_ms']} ms)",
        f"- requests/s through Nginx + gateway at concurrency 16: {o['edge_stub_req_per_s_c16']} single, "
        f"{o['edge_stub_ensemble_req_per_s_c16']} three-member ensembles ({o['errors']} errors)",
        "",
        "## 5. 12 MP JPEG ingestion",
        "",
        f"- {results['ingestion']['jpeg_bytes']} bytes, 4000x3000, to 224x224: plain Pillow "
        f"{results['ingestion']['plain_pillow_ms']} ms, ours {results['ingestion']['ours_ms']} ms "
        f"({results['ingestion']['speedup']}x)",
        "",
        "## 6. Resident memory (MB)",
        "",
        "| process | idle | warm | after load |",
        "|---|---|---|---|",
    ]
    for name, idle in results["e2e"]["memory_idle_mb"].items():
        lines.append(
            f"| {name} | {idle} | {results['e2e']['memory_warm_mb'].get(name, '')} | "
            f"{results['e2e']['memory_after_mb'].get(name, '')} |"
        )
    lines.append(
        f"| seed-style server (4 workers) | | {results['seed']['memory_idle_mb']} | "
        f"{results['seed']['memory_after_mb']} |"
    )
    if results.get("bentoml"):
        lines.append(
            f"| BentoML (1 worker) | | {results['bentoml']['memory_idle_mb']} | "
            f"{results['bentoml']['memory_after_mb']} |"
        )
    lines += _overload_section(results)
    lines += ["", f"Whole run: {results['duration_s']} s.", ""]
    return "\n".join(lines)


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["e2e"]["runs"] + results["seed"]["runs"] + (results.get("bentoml") or {}).get("runs", [])
    targets_ = list(dict.fromkeys(r["target"] for r in runs))
    concurrencies = sorted({r["connections"] for r in runs})
    figure, axis = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(concurrencies)
    for i, connections in enumerate(concurrencies):
        values = [
            next((r["img_per_s"] for r in runs if r["target"] == t and r["connections"] == connections), 0)
            for t in targets_
        ]
        axis.bar(
            [x + i * width for x in range(len(targets_))], values, width, label=f"concurrency {connections}"
        )
    best = _raw_best(results, "resnet50", 1)["img_per_s"]
    axis.axhline(best, color="gray", linestyle="--", linewidth=1, label=f"ResNet50 raw batch 1 ({best})")
    axis.set_xticks([x + width for x in range(len(targets_))], [t.replace(" ", "\n") for t in targets_])
    axis.set_ylabel("images / second")
    axis.set_title("Through Nginx -> gateway -> service, vs a seed-style server and BentoML (ResNet50)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def write(results: dict[str, Any], folder: Path) -> None:
    (folder / "results.md").write_text(markdown(results))
    chart(results, folder / "chart.png")
