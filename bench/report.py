"""Turn bench results into results.md (tables + target verdicts) and chart.png."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from serving.quantize import Gate


def _raw_rows(results: dict[str, Any], model: str, int8: bool, bf16: bool = False) -> list[dict[str, Any]]:
    """``model``'s raw rows of the runtimes the fleet can serve with (not Keras' ``model.predict``):
    fp32, ``PRECISION=int8``, or (``bf16``) the bf16 form ``PRECISION=auto`` serves."""
    return [
        r
        for r in results["raw"]
        if r["model"] == model
        and "model.predict" not in r["backend"]
        and ("PRECISION=int8" in r["backend"]) == int8
        and r["backend"].startswith("openvino bf16") == bf16
    ]


def _raw_best(results: dict[str, Any], model: str, batch: int) -> dict[str, Any]:
    """The fastest fp32 runtime at ``batch``, one call at a time (what one client could get)."""
    single = [r for r in _raw_rows(results, model, False) if r["batch"] == batch and r.get("streams", 1) == 1]
    return max(single, key=lambda r: r["img_per_s"])


def _raw_top(results: dict[str, Any], model: str, int8: bool, bf16: bool = False) -> dict[str, Any]:
    """The runtime's best rate in any form measured (batch 1 or 8, one call at a time or its
    streams at once), fp32, bf16 or PRECISION=int8: issue 19's reference."""
    return max(_raw_rows(results, model, int8, bf16), key=lambda r: r["img_per_s"])


def _raw_form(row: dict[str, Any]) -> str:
    return f"{row['backend']}, batch {row['batch']}"


def plumbing_targets(results: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """Issue 19's targets: the fleet against its own runtime, the edge with stub services, and
    the raw-tensor protocols against the JPEG body."""
    rows: list[tuple[str, str, bool]] = []
    ours = _resnet50(results)
    q = results.get("int8")
    if q:
        served, raw = (
            {r["connections"]: r for r in q["runs"]}[8]["img_per_s"],
            _raw_top(results, "resnet50", True),
        )
        rows.append(
            (
                "int8 fleet at 8 clients >= 75% of the raw int8 runtime's best (issue #19)",
                f"{served} vs {raw['img_per_s']} img/s ({_raw_form(raw)}): {served / raw['img_per_s']:.0%}",
                served >= 0.75 * raw["img_per_s"],
            )
        )
    served = results["e2e"].get("precision", {}).get("resnet50") or "fp32"
    raw = _raw_top(results, "resnet50", False, served == "bf16")
    rows.append(
        (
            f"The default fleet ({served}) at 8 clients >= 90% of the raw {served} runtime's best (#19)",
            f"{ours[8]['img_per_s']} vs {raw['img_per_s']} img/s ({_raw_form(raw)}): "
            f"{ours[8]['img_per_s'] / raw['img_per_s']:.0%}",
            ours[8]["img_per_s"] >= 0.9 * raw["img_per_s"],
        )
    )
    o = results["overhead"]
    rows += [
        (
            "Gateway + Nginx add <= 1.5 ms at p50 (stub services, issue #19)",
            f"{o['added_p50_ms']} ms ({o['direct_stub_p50_ms']} direct, {o['edge_stub_p50_ms']} through)",
            o["added_p50_ms"] <= 1.5,
        ),
        (
            ">= 1,000 req/s through Nginx and the gateway at 16 clients (stub services, issue #19)",
            f"{o['edge_stub_req_per_s_c16']} req/s",
            o["edge_stub_req_per_s_c16"] >= 1000,
        ),
        (
            "Cache hits >= 3,000 req/s at 16 clients (issue #19)",
            f"{o['cache_hits_req_per_s_c16']} req/s, p50 {o['cache_hits_p50_ms']} ms",
            o["cache_hits_req_per_s_c16"] >= 3000,
        ),
    ]
    p = results.get("protocols")
    if p:
        summary = p["summary"]
        jpeg = summary["v1 JPEG body"]["median_img_per_s"]
        for name in ("v2 REST, binary", "v2 gRPC"):
            rate = summary[name]["median_img_per_s"]
            rows.append(
                (
                    f"{name} at 8 clients >= the JPEG body's goodput, int8 (issue #19)",
                    f"{rate} vs {jpeg} img/s ({rate / jpeg:.2f}x, medians of {len(p['runs'][name])} rounds)",
                    rate >= jpeg,
                )
            )
    return rows


def _resnet50(results: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """The fleet's fp32 ResNet50 runs by clients."""
    return {r["connections"]: r for r in results["e2e"]["runs"] if r["target"] == "resnet50"}


PEER_NAMES = {"bentoml": "BentoML", "litserve": "LitServe", "mlserver": "MLServer"}


def _peers(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each installed peer's results: its version and a sweep per precision (``bench.baselines``).
    Results from before the peers (BentoML alone, on TensorFlow) read as BentoML's fp32."""
    if "peers" in results:
        return {name: peer for name, peer in results["peers"].items() if peer}
    legacy = {"version": "1.4 on TensorFlow", "fp32": results.get("bentoml")}
    return {"bentoml": legacy} if legacy["fp32"] else {}


def _peer_sweeps(results: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(peer's name and version, precision, its sweep) for every sweep measured."""
    return [
        (f"{PEER_NAMES[name]} {peer['version']}".strip(), precision, peer[precision])
        for name, peer in _peers(results).items()
        for precision in ("fp32", "bf16", "int8")
        if precision in peer
    ]


def _peer_runs(
    results: dict[str, Any], precisions: tuple[str, ...] = ("fp32", "bf16", "int8")
) -> list[dict[str, Any]]:
    return [
        r for _, precision, sweep in _peer_sweeps(results) if precision in precisions for r in sweep["runs"]
    ]


def targets(results: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """The issue's targets, each with what was measured in this run and whether it was met."""
    best = _raw_best(results, "resnet50", 1)
    ours = _resnet50(results)
    bento = {r["connections"]: r for r in _peers(results).get("bentoml", {}).get("fp32", {}).get("runs", [])}
    top = max(r["img_per_s"] for r in ours.values())
    weakest = min((c for c in ours if c >= 2), key=lambda c: ours[c]["img_per_s"])
    refused = {c: ours[c]["refused"] + ours[c]["errors"] for c in ours if c <= 32}
    batch1_ms = 1000 / best["img_per_s"]
    memory = sum(results["e2e"]["memory_after_mb"].values())
    warm = sum(results["e2e"]["memory_warm_mb"].values())
    o = results["overload"]
    rows = [
        (
            "0 refusals or errors at 1-32 clients (ResNet50, clients ignore Retry-After)",
            ", ".join(f"c={c}: {n}" for c, n in refused.items()),
            not any(refused.values()),
        ),
        (
            "Goodput at every concurrency 2-64 >= 90% of the best",
            f"weakest c={weakest}: {ours[weakest]['img_per_s']} vs best {top} img/s "
            f"({ours[weakest]['img_per_s'] / top:.0%})",
            ours[weakest]["img_per_s"] >= 0.9 * top,
        ),
        (
            "8 clients >= 85% of the best raw fp32 batch-1 rate",
            f"{ours[8]['img_per_s']} vs {best['img_per_s']} img/s ({best['backend']}): "
            f"{ours[8]['img_per_s'] / best['img_per_s']:.0%}",
            ours[8]["img_per_s"] >= 0.85 * best["img_per_s"],
        ),
    ]
    if bento:
        rows.append(
            (
                "8 clients >= 1.5x BentoML (same model, same run)",
                f"{ours[8]['img_per_s']} vs {bento[8]['img_per_s']} img/s: "
                f"{ours[8]['img_per_s'] / max(bento[8]['img_per_s'], 1e-9):.2f}x",
                ours[8]["img_per_s"] >= 1.5 * bento[8]["img_per_s"],
            )
        )
    else:
        rows.append(("8 clients >= 1.5x BentoML", "BentoML not installed: not measured", False))
    j = results.get("jobs")
    if j:
        alone, p50s = (
            j["job_alone"],
            (j["interactive_unloaded"]["p50_ms"], j["interactive_during_job"]["p50_ms"]),
        )
        rows += [
            (
                f"A {j['images']:,}-image ResNet50 job >= 90% of the 8-client interactive rate",
                f"{alone['img_per_s']} vs {ours[8]['img_per_s']} img/s "
                f"({alone['img_per_s'] / ours[8]['img_per_s']:.0%}); {alone['failed']} failed",
                alone["img_per_s"] >= 0.9 * ours[8]["img_per_s"] and not alone["failed"],
            ),
            (
                "While it runs, an interactive client's p50 <= 2.5x unloaded",
                f"{p50s[0]} -> {p50s[1]} ms ({j['p50_ratio']}x)",
                j["p50_ratio"] is not None and j["p50_ratio"] <= 2.5,
            ),
        ]
    q = results.get("int8")
    if q:
        int8_runs = {r["connections"]: r for r in q["runs"]}
        resident = sum(q["memory_loaded_mb"].values())
        agreeing = {m: g["int8"]["top1_agreement"] for m, g in q["gates"].items()}
        rows += [
            (
                "int8 (issue #11): ResNet50 end to end at 8 clients >= 1.5x the fp32 fleet",
                f"{int8_runs[8]['img_per_s']} vs {ours[8]['img_per_s']} img/s "
                f"({int8_runs[8]['img_per_s'] / ours[8]['img_per_s']:.2f}x); served as {q['precision']}",
                int8_runs[8]["img_per_s"] >= 1.5 * ours[8]["img_per_s"],
            ),
            (
                "int8: the whole fleet resident <= 1.1 GB after load",
                f"{resident / 1024:.2f} GB after load ({resident:.0f} MB: "
                + ", ".join(f"{k} {v:.0f}" for k, v in sorted(q["memory_loaded_mb"].items()))
                + ")",
                resident <= 1.1 * 1024,
            ),
            (
                "int8: top-1 equal to fp32 on >= 90% of validation photos, per model",
                (", ".join(f"{m} {a:.0%}" for m, a in sorted(agreeing.items())) or "no gate records")
                + f" (full int8); served as {q['precision']}",
                bool(agreeing) and all(a >= 0.9 for a in agreeing.values()),
            ),
        ]
    c = results.get("custom")
    if c:
        rows.append(
            (
                "Ten custom models on ResNet50 add <= 100 MB (issue #12)",
                f"+{c['ten_models_mb']['added']} MB (resnet50 service + gateway)",
                c["ten_models_mb"]["added"] <= 100,
            )
        )
    rows += [
        (
            "1 client p50 <= raw batch-1 time + 15 ms",
            f"{ours[1]['p50_ms']} ms vs {batch1_ms:.1f} + 15 ms",
            ours[1]["p50_ms"] <= batch1_ms + 15,
        ),
        (
            f"Open loop at {o['factor']:g}x capacity: goodput >= 85% of capacity",
            f"{o['goodput_req_per_s']} of {o['capacity_req_per_s']} req/s ({o['goodput_share']:.0%})",
            o["goodput_share"] >= 0.85,
        ),
        (
            "Open loop: refusals answered p99 <= 50 ms",
            f"{o['refused']} refused, p99 {o['refusal_latency']['p99_ms']} ms, "
            f"max {o['refusal_latency']['max_ms']} ms",
            o["refusal_latency"]["p99_ms"] <= 50,
        ),
        (
            "Open loop: 0 connection errors or 502s",
            f"{o['connection_errors']} connection errors, {o['bad_gateway']} 502s",
            not o["connection_errors"] and not o["bad_gateway"],
        ),
        (
            "Open loop: no admitted request misses its deadline",
            f"{o['missed_deadline']} of {o['accepted']} accepted (504 or over 30 s)",
            not o["missed_deadline"],
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
    ]
    return rows + plumbing_targets(results)


def _cpu(results: dict[str, Any]) -> str:
    """The CPUs every figure was measured on: how many, and their name where the run recorded it."""
    name = results["machine"].get("cpu")
    return f"{results['machine']['cpus']} CPUs" + (f", {name}" if name else "")


def _peers_section(results: dict[str, Any]) -> list[str]:
    """The fleet beside each peer serving its ResNet50 IR, at 1 and 8 clients, fp32 and int8."""
    sweeps = _peer_sweeps(results)
    if not sweeps:
        return ["", "## 3b. The peers: none was installed (bench/.venv-*), none measured."]
    served = results["e2e"].get("precision", {}).get("resnet50", "fp32")  # PRECISION=auto: bf16 or fp32
    fleet = [("fleet", served, "nginx -> gateway -> service, JPEG body (the defaults)", _resnet50(results))]
    q = results.get("int8")
    if q:
        served = q["precision"].get("resnet50", "int8")
        path = f"nginx -> gateway -> service, JPEG body (served as {served})"
        fleet.append(("fleet", "int8", path, {r["connections"]: r for r in q["runs"]}))
    rows = fleet + [
        (name, precision, sweep["runs"][0]["path"], {r["connections"]: r for r in sweep["runs"]})
        for name, precision, sweep in sweeps
    ]
    lines = [
        "",
        f"## 3b. The peers serving the fleet's ResNet50 IR, in the same run ({_cpu(results)})",
        "",
        "Each peer serves the IR the fleet serves the way its docs show (bench/peer_model.py): Pillow "
        "decodes and resizes, NumPy does Keras' caffe preprocessing, the framework batches up to 8 "
        "(LitServe and MLServer within 5 ms, BentoML as its adaptive batching decides); OpenVINO with "
        "the arithmetic of the fleet's form it is compared with (f32 for fp32 and int8, bf16 for bf16, "
        "where this CPU computes it natively), on the latency hint (one batch at a time).",
        "",
        "| server | path | precision | 1 client img/s | p50 ms | 8 clients img/s | p50 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, precision, path, runs in rows:
        one, eight = runs.get(1, {}), runs.get(8, {})
        lines.append(
            f"| {name} | {path} | {precision} | {one.get('img_per_s', '')} | {one.get('p50_ms', '')} | "
            f"{eight.get('img_per_s', '')} | {eight.get('p50_ms', '')} |"
        )
    return lines


def _jobs_section(results: dict[str, Any]) -> list[str]:
    j = results.get("jobs")
    if not j:
        return []
    alone, beside = j["job_alone"], j["job_with_interactive"]
    quiet, busy = j["interactive_unloaded"], j["interactive_during_job"]
    return [
        "",
        f"## 8. Asynchronous jobs: {j['images']:,} photos, ResNet50, one worker (default settings)",
        "",
        f"- alone: {alone['done']} done, {alone['failed']} failed in {alone['seconds']} s: "
        f"**{alone['img_per_s']} img/s** (started to finished, the job record's clock)",
        f"- beside one interactive client: {beside.get('img_per_s')} img/s; the client's p50 "
        f"{quiet['p50_ms']} ms unloaded -> {busy['p50_ms']} ms during the job ({j['p50_ratio']}x), "
        f"p99 {quiet['p99_ms']} -> {busy['p99_ms']} ms, {busy['refused']} refused",
    ]


def _custom_section(results: dict[str, Any]) -> list[str]:
    c = results.get("custom")
    if not c:
        return []
    t, memory = c["training"], c["ten_models_mb"]
    return [
        "",
        "## 10. Custom classes: a ResNet50 head trained on 4 colour classes (default options)",
        "",
        *(
            [f"Measured again on its own at {c['measured']} (`python -m bench.run --only custom`).", ""]
            if c.get("measured")
            else []
        ),
        f"- training job: {t['status']} in {t['seconds']} s ({t['images']} photos, {t['epochs']} epochs, "
        "features from the ResNet50 service at background priority, head fitted with Keras)",
        f"- accuracy: held out {t['held_out_accuracy']} ({t['held_out_images']} photos), fresh photos "
        f"through Nginx {t['fresh_accuracy']} ({t['fresh_images']})",
        f"- ten more custom models on ResNet50: resnet50 service + gateway "
        f"{sum(memory['before'].values()):.0f} -> {sum(memory['after'].values()):.0f} MB "
        f"(+{memory['added']} MB)",
    ] + _fine_tuned_lines(c.get("fine_tuned"))


def _fine_tuned_lines(f: dict[str, Any] | None) -> list[str]:
    if not f:
        return []
    memory = f["resnet50_service_mb"]
    return [
        f"- fine-tuned (fine_tune_layers={f['fine_tune_layers']}, ResNet50's last block with the head), "
        f"same photos: {f['status']} in {f['seconds']} s ({f['epochs']} epochs: the head's, then the "
        f"block's with it); published after {f.get('to_published_s')} s, served "
        f"{f.get('published_to_served_s')} s later (converted and warmed by the ResNet50 service)",
        f"- its accuracy: held out {f['held_out_accuracy']} ({f['held_out_images']} photos), fresh photos "
        f"{f['fresh_accuracy']} ({f['fresh_images']})",
        f"- its cost: the ResNet50 service {memory['before']:.0f} -> {memory['after']:.0f} MB "
        f"(+{f['added_mb']} MB: a copy of the backbone); batch-1 p50 through Nginx "
        f"{f['fine_tuned_p50_ms']} ms vs ResNet50's {f['resnet50_p50_ms']} ms",
        f"- deleted, its copy went back in {f.get('released_after_s')} s: the ResNet50 service "
        f"{memory.get('released', 0):.0f} MB",
    ]


def _int8_section(results: dict[str, Any]) -> list[str]:
    q = results.get("int8")
    if not q:
        return []
    runs = {r["connections"]: r for r in q["runs"]}
    lines = [
        "",
        "## 9. int8: the default fleet with PRECISION=int8 (NNCF post-training quantization)",
        "",
        f"- served as: {q['precision']}",
        f"- ResNet50 end to end: 1 client {runs[1]['img_per_s']} img/s (p50 {runs[1]['p50_ms']} ms), "
        f"8 clients {runs[8]['img_per_s']} img/s (p50 {runs[8]['p50_ms']} ms), refused "
        f"{runs[1]['refused'] + runs[8]['refused']}",
        "- resident MB after load: "
        + ", ".join(f"{k} {v:.0f}" for k, v in sorted(q["memory_loaded_mb"].items()))
        + f" (total {sum(q['memory_loaded_mb'].values()):.0f}); after the runs: "
        + f"{sum(q['memory_after_mb'].values()):.0f}",
    ]
    gate = Gate()
    for model, candidates in sorted(q["gates"].items()):
        lines.append(
            f"- {model} gate: "
            + "; ".join(
                f"{precision} top-1 agreement {g['top1_agreement']:.0%}, top-5 overlap "
                f"{g['top5_overlap']:.0%} ({'passed' if gate.admits(g) else 'refused'})"
                for precision, g in candidates.items()
            )
        )
    return lines


def _overload_section(results: dict[str, Any]) -> list[str]:
    o = results["overload"]
    accepted, refused = o["accepted_latency"], o["refusal_latency"]
    return [
        "",
        f"## 7. Overload: open loop at {o['factor']:g}x capacity (ResNet50, default settings)",
        "",
        f"- capacity: {o['capacity_req_per_s']} req/s (the sweep's best); offered "
        f"{o['offered_req_per_s']} req/s for {o['requests']} requests, each with new bytes",
        f"- {o['accepted']} accepted ({o['goodput_req_per_s']} req/s goodput, {o['goodput_share']:.0%} of "
        f"capacity, average batch {o['average_batch']}), {o['refused']} refused "
        f"({o['refused_with_retry_after']} with Retry-After), {o['connection_errors']} connection errors, "
        f"{o['bad_gateway']} 502s, {o['missed_deadline']} missed deadlines, other: {o['other'] or 'none'}",
        f"- accepted latency p50 {accepted['p50_ms']} ms, p99 {accepted['p99_ms']} ms, max "
        f"{accepted['max_ms']} ms; refusals answered in p50 {refused['p50_ms']} ms, p99 {refused['p99_ms']} "
        f"ms, max {refused['max_ms']} ms; the load generator's schedule lag p99 "
        f"{o['schedule_lag_p99_ms']} ms",
    ]


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"# Benchmark ({results['started']}, {_cpu(results)}, "
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
        "## 2-3. End to end under load (600x400 JPEG, new bytes every request, clients ignore Retry-After)",
        "",
        "| target | path | clients | img/s | p50 ms | p95 ms | p99 ms | refused | errors | average batch |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["e2e"]["runs"] + results["seed"]["runs"] + _peer_runs(results):
        lines.append(
            f"| {r['target']} | {r['path']} | {r['connections']} | {r['img_per_s']} | {r['p50_ms']} | "
            f"{r['p95_ms']} | {r['p99_ms']} | {r['refused']} | {r['errors']} | {r.get('average_batch', '')} |"
        )
    lines += [
        "",
        f"Backends served: {results['e2e']['backends']}.",
        "",
        "Batching over the whole run (requests, images, batches, largest batch, refused, expired):",
        "",
    ]
    for name, stats in results["e2e"]["batching"].items():
        lines.append(
            f"- {name}: {stats['requests']} requests, {stats['images']} images in {stats['batches']} "
            f"batches (average {stats['average_batch']}, largest {stats['largest_batch']}), "
            f"{stats['shed']} refused, {stats['expired']} expired; ms per call by batch size "
            f"{stats['batch_ms']}"
        )
    lines += _peers_section(results)
    o = results["overhead"]
    lines += [
        "",
        "## 4. Gateway + Nginx overhead (stub model services)",
        "",
        f"- p50 straight to a stub service: {o['direct_stub_p50_ms']} ms; through Nginx and the gateway: "
        f"{o['edge_stub_p50_ms']} ms (added {o['added_p50_ms']} ms)",
        f"- requests/s through Nginx + gateway at concurrency 16: {o['edge_stub_req_per_s_c16']} single, "
        f"{o['edge_stub_ensemble_req_per_s_c16']} three-member ensembles ({o['errors']} errors)",
        f"- cache hits (the same photo again) at concurrency 16: {o['cache_hits_req_per_s_c16']} req/s, "
        f"p50 {o['cache_hits_p50_ms']} ms",
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
    for name, precision, sweep in _peer_sweeps(results):
        lines.append(f"| {name}, {precision} | | {sweep['memory_idle_mb']} | {sweep['memory_after_mb']} |")
    lines += _overload_section(results)
    lines += _jobs_section(results)
    lines += _int8_section(results)
    lines += _custom_section(results)
    lines += ["", f"Whole run: {results['duration_s']} s.", ""]
    return "\n".join(lines)


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["e2e"]["runs"] + results["seed"]["runs"] + _peer_runs(results, ("fp32",))
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
    axis.set_title(
        "Through Nginx -> gateway -> service, vs a seed-style server and the peers (ResNet50 fp32)"
    )
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def write(results: dict[str, Any], folder: Path) -> None:
    (folder / "results.md").write_text(markdown(results))
    chart(results, folder / "chart.png")
