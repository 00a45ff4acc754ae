"""The perf issue's goals as data: what each goal reads from the measurements, its bound, and the tables.

    from _goal_table import goal_rows, network_rows, markdown_table

benchmarks/goals.py gathers the measurements (each side in its own process) into one dict; this file only
reads it, so the table logic is checked without running a benchmark (tests/test_benchmark_goals.py):

    measurements = {
        "models": {component: {side: {"seconds", "peak_rss_gib", "rel_err", "loadavg": [start, end]}}},
        "pipeline": {"npdiff": {"wall_s", "peak_rss_gib", "loadavg"}, "diffusers": {...}, "max_pixel_diff"},
        "tiled": {"npdiff": {"decode_s", "peak_rss_gib", "loadavg"}, "torch": {...}, "max_pixel_diff", "size"},
        "large": {"npdiff": {"decode_s", "peak_rss_gib", "loadavg"}, "size"},
        "colours": {"right", "of", "seed", "loadavg"},
    }
components: unet, vae_decode, text_encoder; sides: torch (float32, the anchor), npdiff, npdiff_bf16,
openvino_f32, openvino_bf16. A figure that was not measured (a part left out, a side that failed) makes its
row say "not measured" instead of failing the table.
"""

from collections.abc import Callable
from dataclasses import dataclass

NETWORKS = {"unet": "SD 1.5 UNet, batch 2, 64x64 latent", "vae_decode": "VAE decode 64x64 -> 512x512",
            "text_encoder": "CLIP text encoder, batch 2 x 77"}
SIDES = {"npdiff": "npdiff float32", "npdiff_bf16": "npdiff bf16", "torch": "torch float32",
         "openvino_f32": "OpenVINO f32", "openvino_bf16": "OpenVINO bf16"}


@dataclass(frozen=True)
class Goal:
    what: str
    measure: Callable  # measurements -> (value, detail text, [the side records it read, for their load])
    bound: float | None = None  # None: a figure shown beside the goals, with nothing to meet
    compare: str = "<="  # "<=", "<" or ">="
    fmt: str = "{:.2f}"


def time_ratio(component, side, anchor="torch"):
    """side's seconds over anchor's seconds for one network."""
    def measure(m):
        ours, theirs = m["models"][component][side], m["models"][component][anchor]
        value = ours["seconds"] / theirs["seconds"]
        return value, f"{ours['seconds']:.3f} s / {theirs['seconds']:.3f} s", [ours, theirs]
    return measure


def rel_err(component, side):
    def measure(m):
        record = m["models"][component][side]
        return record["rel_err"], f"against torch float32's output, {SIDES[side]}", [record]
    return measure


def worst_float32_error(m):
    errors = {component: m["models"][component]["npdiff"]["rel_err"] for component in NETWORKS}
    worst = max(errors, key=errors.get)
    detail = ", ".join(f"{component} {error:.1e}" for component, error in errors.items())
    return errors[worst], detail, [m["models"][component]["npdiff"] for component in NETWORKS]


def job_ratio(key):
    """npdiff's over diffusers' figure `key` (wall_s, peak_rss_gib) of the whole job."""
    def measure(m):
        ours, theirs = m["pipeline"]["npdiff"], m["pipeline"]["diffusers"]
        return ours[key] / theirs[key], f"{ours[key]:.2f} / {theirs[key]:.2f}", [ours, theirs]
    return measure


def job_pixels(m):
    job = m["pipeline"]
    return job["max_pixel_diff"], "largest difference of the two 8-bit pictures", [job["npdiff"], job["diffusers"]]


def tiled_pixels(m):
    tiled = m["tiled"]
    return (tiled["max_pixel_diff"], f"{tiled['size']}x{tiled['size']}, both tiled, largest difference",
            [tiled["npdiff"], tiled["torch"]])


def tiled_time(m):
    ours, theirs = m["tiled"]["npdiff"], m["tiled"]["torch"]
    detail = f"{m['tiled']['size']}px: {ours['decode_s']:.1f} s / {theirs['decode_s']:.1f} s"
    return ours["decode_s"] / theirs["decode_s"], detail, [ours, theirs]


def large_peak(m):
    ours = m["large"]["npdiff"]
    return (ours["peak_rss_gib"], f"{m['large']['size']}x{m['large']['size']} tiled, decode {ours['decode_s']:.0f} s",
            [ours])


def colours(m):
    record = m["colours"]
    return record["right"], f"of {record['of']} prompts (seed {record['seed']})", [record]


GOALS = [
    Goal("float32 UNet time / torch float32", time_ratio("unet", "npdiff"), 0.70),
    Goal("float32 UNet time / OpenVINO f32 (ahead of it)", time_ratio("unet", "npdiff", "openvino_f32"), 1.0, "<"),
    Goal("float32 VAE decode time / torch float32", time_ratio("vae_decode", "npdiff"), 0.45),
    Goal("float32 CLIP text encoder time / torch float32", time_ratio("text_encoder", "npdiff"), 0.80),
    Goal("float32 networks' relative error against torch (worst)", worst_float32_error, 1e-4, fmt="{:.1e}"),
    Goal("whole 512x512 job (4 PNDM steps) wall / diffusers", job_ratio("wall_s"), 0.60),
    Goal("whole 512x512 job peak RSS / diffusers", job_ratio("peak_rss_gib"), 0.60),
    Goal("whole 512x512 job: same picture (8-bit levels)", job_pixels, 1, fmt="{}"),
    Goal("bf16 UNet time / torch float32", time_ratio("unet", "npdiff_bf16"), 0.45),
    Goal("bf16 UNet relative error against torch float32", rel_err("unet", "npdiff_bf16"), 3e-2, fmt="{:.1e}"),
    Goal("bf16 VAE decode time / torch float32", time_ratio("vae_decode", "npdiff_bf16"), 0.45),
    Goal("bf16 VAE decode relative error against torch float32", rel_err("vae_decode", "npdiff_bf16"), 3e-2,
         fmt="{:.1e}"),
    Goal("shipped model at bf16: prompts drawn in the named colours", colours, 11, ">=", fmt="{}"),
    Goal("tiled decode against diffusers' tiled decode (8-bit levels)", tiled_pixels, 2, fmt="{}"),
    Goal("2048x2048 tiled decode peak RSS (GiB)", large_peak, 3.0),
    # beside the goals: the engines a CPU user could pick instead, and the tiled decode's speed
    Goal("OpenVINO f32 UNet time / torch float32", time_ratio("unet", "openvino_f32")),
    Goal("OpenVINO bf16 UNet time / torch float32", time_ratio("unet", "openvino_bf16")),
    Goal("OpenVINO bf16 UNet relative error against torch float32", rel_err("unet", "openvino_bf16"), fmt="{:.1e}"),
    Goal("bf16 UNet time / OpenVINO bf16", time_ratio("unet", "npdiff_bf16", "openvino_bf16")),
    Goal("bf16 VAE decode time / OpenVINO bf16", time_ratio("vae_decode", "npdiff_bf16", "openvino_bf16")),
    Goal("float32 CLIP time / OpenVINO f32", time_ratio("text_encoder", "npdiff", "openvino_f32")),
    Goal("tiled decode time / diffusers' tiled decode", tiled_time),
]


def loadavg_text(records):
    """The 1-minute load averages at the start and end of the processes a figure came from: 'low-high'."""
    loads = [value for record in records for value in record.get("loadavg") or []]
    if not loads:
        return "-"
    return f"{min(loads):.1f}" if max(loads) - min(loads) < 0.05 else f"{min(loads):.1f}-{max(loads):.1f}"


def is_met(value, goal):
    if goal.bound is None:
        return "(beside)"
    met = {"<=": value <= goal.bound, "<": value < goal.bound, ">=": value >= goal.bound}[goal.compare]
    return "yes" if met else "**no**"


def goal_rows(measurements, goals=GOALS):
    """One row per goal: goal, measured, met ("yes", "**no**", "not measured", "(beside)"), load, detail."""
    rows = []
    for goal in goals:
        target = "-" if goal.bound is None else f"{goal.compare} {goal.fmt.format(goal.bound)}"
        try:
            value, detail, records = goal.measure(measurements)
        except (KeyError, TypeError):  # a part left out, or a side that failed: no figure
            rows.append({"goal": goal.what, "target": target, "measured": "-", "met": "not measured",
                         "load": "-", "detail": ""})
            continue
        rows.append({"goal": goal.what, "target": target, "measured": goal.fmt.format(value),
                     "met": is_met(value, goal), "load": loadavg_text(records), "detail": detail})
    return rows


def network_rows(measurements):
    """One row per network and side: seconds, ratio to torch float32, relative error, peak RSS, load, and the
    process's CPU seconds per call (all its threads: computing, or spinning while it waits for a core)."""
    rows = []
    for component, sides in measurements.get("models", {}).items():
        anchor = sides.get("torch", {}).get("seconds")
        for side, record in sides.items():
            if side not in SIDES:  # openvino_convert: the conversion's record, in the JSON only
                continue
            row = {"network": NETWORKS.get(component, component), "side": SIDES.get(side, side)}
            if "seconds" not in record:
                rows.append(dict(row, note=record.get("error") or record.get("unsupported") or "no figure"))
                continue
            row.update(seconds=f"{record['seconds']:.3f}", load=loadavg_text([record]),
                       ratio=f"{record['seconds'] / anchor:.2f}" if anchor else "-",
                       rel_err=f"{record['rel_err']:.1e}" if record.get("rel_err") is not None else "-",
                       peak_rss=f"{record['peak_rss_gib']:.2f}", note=record.get("note", ""),
                       cpu=f"{record['cpu_seconds']:.2f}" if "cpu_seconds" in record else "-")
            rows.append(row)
    return rows


def markdown_table(rows, columns):
    """columns: [(key, header)]; a missing cell is '-'."""
    lines = ["| " + " | ".join(header for _, header in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(key, "-")) for key, _ in columns) + " |")
    return "\n".join(lines)


GOAL_COLUMNS = [("goal", "goal"), ("target", "target"), ("measured", "measured"), ("met", "met"),
                ("load", "load avg"), ("detail", "detail")]
NETWORK_COLUMNS = [("network", "network"), ("side", "side"), ("seconds", "s per call"), ("ratio", "/ torch f32"),
                   ("cpu", "CPU s per call"),
                   ("rel_err", "rel err vs torch f32"), ("peak_rss", "peak RSS GiB"), ("load", "load avg"),
                   ("note", "note")]
